"""Networks: segmenters, detector heads, the generator, the comparison net, flows."""

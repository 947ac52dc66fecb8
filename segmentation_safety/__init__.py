"""segmentation_safety: per-pixel anomaly and failure maps for semantic segmentation.

The core (this package minus ``ros/``) is pure PyTorch and never imports rclpy.
"""

__version__ = "0.1.0"

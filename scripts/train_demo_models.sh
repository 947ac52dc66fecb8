#!/usr/bin/env bash
# Rebuilds the shipped demo models in models/demo/ from scratch with the project's own
# trainers on the synthetic world, then evaluates them (models/demo/REPORT.md quotes the
# results). The demo segmenter is ESPNetv2: on one H100 the trainings took about 20
# minutes in all (with `workers: 12` added to each config); on a 2-core CPU one
# segmenter training step takes about 6 s, so plan on a GPU. After a kill, run it again
# with RESUME=--resume to continue. The evaluations run on the CPU in a few minutes.
# Usage: source scripts/env.sh && bash scripts/train_demo_models.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
W=${WORLD:-out/world}
M=models/demo
# The shipped bundles are in git, and train refuses to replace a bundle silently: by
# default each step retrains over it. RESUME=--resume continues a run a kill stopped.
RESUME=${RESUME:---restart}

[ -f "$W/world.json" ] || segsafe world --out "$W" --seed 1 --train 800 --val 150 --anomaly 60 --sequences 2 \
  --negative-scenes 800
mkdir -p "$M"
segsafe train segmenter --data "$W" --config config/demo/segmenter.yaml \
  --out "$M/segmenter_base.safetensors" $RESUME
# DenseHybrid fine-tunes the segmenter; the fine-tuned one is the shipped segmenter.safetensors
# and every other detector is fitted on it.
segsafe train densehybrid --data "$W" --config config/demo/densehybrid.yaml \
  --out "$M/densehybrid.safetensors" $RESUME
segsafe train sml --data "$W" --out "$M/sml.safetensors" $RESUME
segsafe train flow --data "$W" --config config/demo/flow.yaml --out "$M/flow.safetensors" $RESUME
segsafe train flowenedet --data "$W" --config config/demo/flowenedet.yaml \
  --out "$M/flowenedet.safetensors" $RESUME
segsafe train flowenedet --data "$W" --config config/demo/flowenedet_c.yaml \
  --out "$M/flowenedet_c.safetensors" $RESUME
segsafe train generator --data "$W" --config config/demo/generator.yaml \
  --out "$M/generator.safetensors" $RESUME
segsafe train comparison --data "$W" --config config/demo/comparison.yaml \
  --out "$M/comparison.safetensors" $RESUME

# The evaluations models/demo/REPORT.md quotes.
E="$M/eval"
segsafe evaluate --root "$W" --split anomaly --quiet --out "$E/anomaly.json" \
  --detectors max_softmax,entropy,max_logit,energy,sml,mc_dropout,densehybrid,flow_density,flowenedet_u,flowenedet_c
segsafe evaluate --root "$W" --split anomaly --quiet --out "$E/anomaly_base.json" \
  --detectors max_softmax,entropy,max_logit,energy --segmenter-weights "$M/segmenter_base.safetensors"
segsafe evaluate --root "$W" --split anomaly --quiet --out "$E/anomaly_resynthesis.json" \
  --detectors resynthesis,resynthesis_anomaly
segsafe evaluate --root "$W" --split val --quiet --out "$E/val.json" \
  --detectors max_softmax,flowenedet_u,resynthesis

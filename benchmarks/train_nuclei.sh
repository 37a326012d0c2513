#!/usr/bin/env bash
# The measured gain of docs/training.md: fine-tune MobileSAM's decoder on a seeded half of
# dsb2018_nuclei, evaluate 1-click and box mIoU on the other half and on DAVIS (forgetting)
# before and after. Run from the repository root: bash benchmarks/train_nuclei.sh
set -euo pipefail
S=${SHARED_DATA:-../shared/data}
SEG=".venv/bin/segany --threads ${THREADS:-1}"
EC=runs/eval/emb-cache
mkdir -p runs/dsb runs/eval runs/replay

# 1. the split (by image, seed 0): runs/dsb/decoder.{train,val}.json
$SEG train --data $S/dsb2018_nuclei --val-fraction 0.5 --split-seed 0 --out runs/dsb/decoder.pt --split-only

# 2. before: MobileSAM on the held-out half and on DAVIS
evaluate() {  # MODEL NAME
  $SEG eval points runs/dsb/decoder.val.json --images $S/dsb2018_nuclei/images --model "$1" --max-clicks 1 --out runs/eval/$2_dsb_points --embedding-cache $EC --quiet
  $SEG eval boxes  runs/dsb/decoder.val.json --images $S/dsb2018_nuclei/images --model "$1" --out runs/eval/$2_dsb_boxes --embedding-cache $EC --quiet
  $SEG eval points $S/davis17_firstframes --model "$1" --max-clicks 1 --out runs/eval/$2_davis_points --embedding-cache $EC --quiet
  $SEG eval boxes  $S/davis17_firstframes --model "$1" --out runs/eval/$2_davis_boxes --embedding-cache $EC --quiet
}
evaluate mobile_sam base

# 3a. plain decoder fine-tuning (forgets natural images)
RECIPE="--data $S/dsb2018_nuclei --val-fraction 0.5 --split-seed 0 --model mobile_sam --train decoder
  --lr 2e-4 --warmup-steps 10 --point-rounds 1 --empty-rounds 0 --images-per-step 2 --masks-per-image 8"
$SEG train $RECIPE --steps 120 --checkpoint-every 20 --log-every 5 --val-every 40 --val-masks 32 --out runs/dsb/decoder.pt
evaluate runs/dsb/decoder.pt noreplay

# 3b. the IoU head only (--train iou-head): the masks stay MobileSAM's everywhere (box mIoU
#     and the 1-click oracle unchanged by construction), only the choice among the three
#     outputs learns; points only, one round
IOU="--data $S/dsb2018_nuclei --val-fraction 0.5 --split-seed 0 --model mobile_sam --train iou-head
  --lr 1e-3 --warmup-steps 5 --point-rounds 0 --empty-rounds 0 --box-prob 0 --images-per-step 4
  --masks-per-image 16 --checkpoint-every 20 --log-every 5"
$SEG train $IOU --steps 60 --out runs/dsb/iouhead.pt
evaluate runs/dsb/iouhead.pt iouhead

# 3c. the IoU head with replay (self-distillation of the IoUs and of the ranking on unlabeled
#     natural images: COCO-10 pictures, the repository's kitchen, five scikit-image
#     pictures; DAVIS is not among them)
cp $S/coco10/images/*.jpg examples/kitchen.jpg runs/replay/
.venv/bin/python -c "
import skimage.data as d
from PIL import Image
for n in ('astronaut', 'coffee', 'chelsea', 'camera', 'rocket'):
    Image.fromarray(getattr(d, n)()).save(f'runs/replay/{n}.png')
"
$SEG train $IOU --steps 80 --replay runs/replay --replay-weight 4 --replay-points 8 \
  --replay-rank-weight 5 --out runs/dsb/iouhead_replay.pt
evaluate runs/dsb/iouhead_replay.pt iouhead_replay

# 3d. the decoder with supervised rehearsal: one batch of COCO-10's labelled masks (natural
#     images, DAVIS is not among them) per step beside the nuclei batch
REHEARSE="--data $S/dsb2018_nuclei --val-fraction 0.5 --split-seed 0 --model mobile_sam --train decoder
  --lr 2e-4 --warmup-steps 10 --point-rounds 1 --empty-rounds 0 --images-per-step 2 --masks-per-image 8
  --checkpoint-every 20 --log-every 5 --rehearse $S/coco10"
$SEG train $REHEARSE --steps 120 --rehearse-weight 0.5 --box-prob 0.2 --out runs/dsb/rehearse.pt
evaluate runs/dsb/rehearse.pt rehearse

.venv/bin/python benchmarks/train_table.py runs/eval base noreplay iouhead iouhead_replay rehearse

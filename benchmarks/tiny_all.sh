#!/bin/bash
# The whole pipeline (`train.py --stage all`) at tiny, seeded settings, in ~15 s on a 2-core CPU: the before/after
# check of a behaviour-preserving change.  Usage: bash benchmarks/tiny_all.sh CHECKOUT_DIR OUT_DIR
cd "$1" && OMP_NUM_THREADS=1 python train.py --stage all --out_dir "$2" --device cpu --seed 0 \
  --steps 6 --batch_size 4 --n_images 30 --lora_steps 3 --compose_steps 2 --det_steps 3 --seeds 1 \
  --synthetic_images 4 --test_images 6 --low_data 0 --n_boot 20 --sample_every 0 --checkpoint_every 6 \
  --warmup 1 --image_size 64 --attention_levels 1 --crop_size 16 --base_channels 16 --channel_mult 1 2 \
  --context_dim 32 --num_heads 4 --norm_groups 8 --no-mid_attention

"""DDT-L/2 (20 encoder + 4 decoder blocks) on ImageNet 256x256 latents.

    python train.py --config=configs/l_256.py --workdir=/ckpt/ddt_l_256 \
        --config.data.path=/data/imagenet256_latents \
        --config.repa.dinov2_path=/weights/dinov2_vitb14_pretrain.pth

The paper's L split (20en4de); the rest is the XL recipe (configs/xl_256.py), as in the paper's
model-size study.
"""
from configs import xl_256


def get_config(arg: str | None = None):
    c = xl_256.get_config(arg)
    c.model.variant = "L/2"           # hidden 1024, 24 blocks, 16 heads
    c.model.num_encoder_blocks = 20   # paper: DDT-L 20en4de
    c.repa.align_layer = 8            # REPA aligns block 8 for L and XL
    return c

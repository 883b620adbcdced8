"""DDT-B/2 (8 encoder + 4 decoder blocks) on ImageNet 256x256 latents.

    python train.py --config=configs/b_256.py --workdir=/ckpt/ddt_b_256 \
        --config.data.path=/data/imagenet256_latents \
        --config.repa.dinov2_path=/weights/dinov2_vitb14_pretrain.pth

The paper's B split (8en4de); the rest is the XL recipe (configs/xl_256.py).
"""
from configs import xl_256


def get_config(arg: str | None = None):
    c = xl_256.get_config(arg)
    c.model.variant = "B/2"           # hidden 768, 12 blocks, 12 heads
    c.model.num_encoder_blocks = 8    # paper: DDT-B 8en4de
    c.repa.align_layer = 4            # REPA's choice for B-sized models (block 4 of 12)
    # 130M params: f32 params + Adam + EMA fit on any accelerator, so plain data parallelism.
    c.mesh.data = -1
    c.mesh.fsdp = 1
    return c

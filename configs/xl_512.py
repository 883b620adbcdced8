"""DDT-XL/2 22en6de on ImageNet 512x512 latents (64x64): the paper's 512 recipe.

    python train.py --config=configs/xl_512.py --workdir=/ckpt/ddt_xl_512 \
        --config.data.path=/data/imagenet512_latents \
        --config.repa.dinov2_path=/weights/dinov2_vitb14_pretrain.pth

    # fine-tune from a 256 run (same parameter shapes: positions are resolution-normalised RoPE)
    python train.py --config=configs/xl_512.py --config.init_from=/ckpt/ddt_xl_256 ...

Everything not set here is the 256 recipe (configs/xl_256.py); sources as there ("official" =
`configs/repa_improved_ddt_xlen22de6_512.yaml`).
"""
from configs import xl_256


def get_config(arg: str | None = None):
    c = xl_256.get_config(arg)
    c.model.image_size = 64           # official: latent_shape [4, 64, 64]
    c.data.image_size = 512           # official: train_image_size 512
    # official run name "res512_fromscratch_...": trained from scratch, so no init_from by default.
    c.init_from = None
    # DINOv2 sees 448x448 (224 * 512 / 256) = 32x32 tokens = the model's 64/2 x 64/2: no resize.
    c.logging.num_samples = 8         # 4x the tokens of 256: keep the monitoring grid cheap
    c.logging.sample.guidance = 3.0   # official 512 yaml: guidance 3.0 (256: 2.0)
    return c

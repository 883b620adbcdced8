"""SD-VAE port: parity with diffusers' AutoencoderKL, checkpoint layouts, sampling, errors.

Run: .venv/bin/python -m pytest tests/test_vae.py -q     (~23 s of CPU time on 2 cores)

The reference is a small random diffusers VAE (3 levels so the decoder's level order and two
downsamplings are exercised; 8 norm groups so grouping is not per-channel) with every weight,
norms included, randomised, saved with `save_pretrained` and read back by `convert.load_vae`.
"""
import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from flax import nnx
from safetensors.numpy import load_file
from safetensors.torch import save_file

from ddt_jax import convert
from ddt_jax.convert import cli, fill
from ddt_jax.convert import vae as vae_convert
from ddt_jax.models import vae as vae_lib

TINY = dict(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8,
            latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3)
# float32 parity bound, relative to the output's scale (max |reference|); measured ~1.5e-6.
F32_TOL = 1e-5


# Jitted: the whole network compiles in ~3 s, less than op-by-op eager dispatch costs here.
encode = nnx.jit(lambda vae, images: vae.encode(images))
decode = nnx.jit(lambda vae, latents: vae.decode(latents))


def nhwc(t):
    return np.asarray(t.detach().numpy().transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The torch model, its folder on disk, and reference encode/decode outputs."""
    torch.manual_seed(0)
    model = TorchVAE(**TINY).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:   # norm scales around 1, biases around 0: both must be read correctly
                is_scale = "norm" in name and name.endswith("weight")
                p.copy_(float(is_scale) + 0.2 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("vae")
    model.save_pretrained(folder)
    images = torch.rand(2, 3, 24, 40) * 2 - 1
    z_model = torch.randn(2, 4, 6, 10)   # model-space latents (already times the scaling factor)
    with torch.no_grad():
        posterior = model.encode(images).latent_dist
        decoded = model.decode(z_model / model.config.scaling_factor).sample
    return dict(model=model, folder=folder, images=nhwc(images), z=nhwc(z_model),
                mean=nhwc(posterior.mean), logvar=nhwc(posterior.logvar), decoded=nhwc(decoded))


@pytest.fixture(scope="module")
def vae(ref):
    return convert.load_vae(ref["folder"])


def rel_err(x, y):
    return float(np.abs(np.asarray(x) - y).max() / np.abs(y).max())


def assert_same_params(a, b):
    fa = dict(nnx.to_flat_state(nnx.state(a, nnx.Param)))
    fb = dict(nnx.to_flat_state(nnx.state(b, nnx.Param)))
    assert fa.keys() == fb.keys()
    for path in fa:
        np.testing.assert_array_equal(fa[path].get_value(), fb[path].get_value(), err_msg=str(path))


def test_encode_decode_match_diffusers(vae, ref):
    mean, logvar = encode(vae, jnp.asarray(ref["images"]))
    assert mean.shape == logvar.shape == (2, 6, 10, 4) and mean.dtype == jnp.float32
    assert rel_err(mean, ref["mean"]) < F32_TOL
    assert rel_err(logvar, ref["logvar"]) < F32_TOL
    images = decode(vae, jnp.asarray(ref["z"]))
    assert images.shape == (2, 24, 40, 3) and images.dtype == jnp.float32
    assert rel_err(images, ref["decoded"]) < F32_TOL


def test_bf16_compute_is_close(ref):
    vae16 = convert.load_vae(ref["folder"], dtype=jnp.bfloat16)
    assert {v.get_value().dtype for _, v in nnx.to_flat_state(nnx.state(vae16, nnx.Param))} \
        == {jnp.dtype(jnp.float32)}
    # The decoder alone: it runs every layer kind (bf16 on CPU is slow, and encode shares them).
    images = decode(vae16, jnp.asarray(ref["z"][:1]))
    assert images.dtype == jnp.float32
    # bf16 keeps 8 mantissa bits; through ~20 convs the error is ~1% of the scale (0.6-1.7%
    # measured).
    assert rel_err(images, ref["decoded"][:1]) < 5e-2


def test_pickled_folder_and_pipeline_folder(vae, ref, tmp_path):
    ref["model"].save_pretrained(tmp_path / "vae", safe_serialization=False)
    assert (tmp_path / "vae" / "diffusion_pytorch_model.bin").exists()
    assert_same_params(convert.load_vae(tmp_path), vae)   # pipeline root: finds vae/


def test_single_file_diffusers_keys_and_inferred_config(vae, ref, tmp_path):
    state = ref["model"].state_dict()
    path = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    assert_same_params(convert.load_vae(path, config=TINY), vae)
    # Without a config, shapes give everything but the group count and scale (SD defaults then).
    numpy_state = {k: v.numpy() for k, v in state.items()}
    inferred = vae_convert.infer_config(numpy_state, path)
    cfg = vae_lib.VAEConfig.from_dict(inferred)
    assert cfg == vae_lib.VAEConfig.from_dict({**TINY, "norm_num_groups": 32})
    assert cfg.scaling_factor == vae_lib.SD_VAE_SCALING_FACTOR


def to_ldm_keys(state, levels):
    """diffusers -> original LDM/CompVis VAE names (an independent inverse of load_vae's
    renames)."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
        key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.",
                     r"encoder.down.\1.downsample.", key)
        if m := re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.(.*)", key):
            kind = "block" if m[2] == "resnets" else "upsample"
            key = f"decoder.up.{levels - 1 - int(m[1])}.{kind}.{m[3]}"
        key = key.replace("mid_block.resnets.0.", "mid.block_1.")
        key = key.replace("mid_block.resnets.1.", "mid.block_2.")
        key = key.replace("mid_block.attentions.0.group_norm.", "mid.attn_1.norm.")
        for new, old in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            key = key.replace(f"mid_block.attentions.0.{new}.", f"mid.attn_1.{old}.")
        key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if ".attn_1." in key and value.ndim == 2:
            value = value[:, :, None, None]   # LDM attention projections are 1x1 convs
        out[key] = value.contiguous()
    return out


def test_ldm_single_file(vae, ref, tmp_path):
    ldm = to_ldm_keys(ref["model"].state_dict(), levels=3)
    assert "decoder.up.2.upsample.conv.weight" in ldm and "encoder.mid.attn_1.q.weight" in ldm
    path = tmp_path / "vae-ldm.safetensors"
    save_file(ldm, str(path))
    assert_same_params(convert.load_vae(path, config=TINY), vae)
    # As a whole SD checkpoint: the VAE lives under first_stage_model., the rest is ignored.
    full = {f"first_stage_model.{k}": v for k, v in ldm.items()}
    full["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(3)
    save_file(full, str(tmp_path / "sd.safetensors"))
    assert_same_params(convert.load_vae(tmp_path / "sd.safetensors", config=TINY), vae)


def test_legacy_attention_names(vae, ref, tmp_path):
    legacy = {}
    for key, value in ref["model"].state_dict().items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                         ("to_out.0", "proj_attn")):
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[key] = value.contiguous()
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in legacy
    save_file(legacy, str(tmp_path / "old.safetensors"))
    assert_same_params(convert.load_vae(tmp_path / "old.safetensors", config=TINY), vae)


def test_sd_vae_structure_matches_diffusers():
    """Every parameter of the full SD-VAE maps to a diffusers key of the right shape (no
    compute)."""
    with torch.device("meta"):
        torch_vae = TorchVAE(**vae_lib.SD_VAE_CONFIG,
                             down_block_types=("DownEncoderBlock2D",) * 4,
                             up_block_types=("UpDecoderBlock2D",) * 4)
    torch_shapes = {k: tuple(v.shape) for k, v in torch_vae.state_dict().items()}
    ours = nnx.eval_shape(lambda: vae_lib.AutoencoderKL())
    our_shapes = {vae_convert.torch_key(p): fill.torch_shape(p, tuple(v.get_value().shape))
                  for p, v in nnx.to_flat_state(nnx.state(ours, nnx.Param))}
    assert our_shapes == torch_shapes
    assert sum(int(np.prod(s)) for s in our_shapes.values()) == 83_653_863
    assert ours.config.downsample_factor == 8


def test_sample_latents():
    sf = vae_lib.SD_VAE_SCALING_FACTOR
    n = 20_000
    mean = jnp.tile(jnp.array([0.5, -1.0, 0.0, 0.0]), (n, 1))
    logvar = jnp.tile(jnp.array([0.0, np.log(4.0), 50.0, -100.0]), (n, 1))
    moments = jnp.concatenate([mean, logvar], -1)
    key = jax.random.key(0)
    z = vae_lib.sample_latents(moments, key)
    assert z.shape == (n, 4) and z.dtype == jnp.float32
    eps = jax.random.normal(key, (n, 4))
    std = jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))
    np.testing.assert_allclose(z, sf * (mean + std * eps), rtol=1e-6)
    # Statistics: channel means sf*mean, stds sf*exp(clamp(logvar)/2) (logvar 50 -> 20,
    # -100 -> -30).
    want_std = sf * np.array([1.0, 2.0, np.exp(10.0), np.exp(-15.0)])
    np.testing.assert_allclose(z.std(0), want_std, rtol=0.03)
    assert np.all(np.abs(z.mean(0) - sf * np.array([0.5, -1.0, 0, 0])) < 0.03 * want_std)
    # Any moments dtype (e.g. a bf16 cache) and other keys give other samples; odd width is an
    # error.
    z16 = vae_lib.sample_latents(moments.astype(jnp.bfloat16)[:8], jax.random.key(1), 1.0)
    assert z16.dtype == jnp.float32 and not np.allclose(z16, z[:8] / sf)
    with pytest.raises(ValueError, match="mean\\|\\|logvar"):
        vae_lib.sample_latents(moments[:, :7], key)


def test_errors(vae, ref, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert.load_vae(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        convert.load_vae(tmp_path / "empty")
    state = {k: v.contiguous() for k, v in ref["model"].state_dict().items()}
    state.pop("decoder.conv_out.bias")
    state["encoder.extra.weight"] = torch.zeros(1)
    state["quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError) as info:
        convert.load_vae(tmp_path / "bad.safetensors", config=TINY)
    msg = str(info.value)
    assert "missing keys (1): decoder.conv_out.bias" in msg
    assert "unexpected keys (1): encoder.extra.weight" in msg
    assert "quant_conv.weight: got (8, 8, 3, 3), expected (8, 8, 1, 1)" in msg
    with pytest.raises(ValueError, match="not divisible by norm_num_groups"):
        vae_lib.AutoencoderKL({**TINY, "norm_num_groups": 24})
    with pytest.raises(ValueError, match="unknown keys \\['latent_chanels'\\]"):
        vae_lib.AutoencoderKL({"latent_chanels": 4})
    with pytest.raises(ValueError, match="up_block_types"):
        vae_lib.VAEConfig.from_dict({**TINY, "up_block_types": ["AttnUpDecoderBlock2D"] * 3})
    with pytest.raises(ValueError, match="NHWC"):
        vae.encode(jnp.zeros((1, 3, 24, 40)))
    with pytest.raises(ValueError, match="divisible by the downsampling factor 4"):
        vae.encode(jnp.zeros((1, 26, 40, 3)))
    with pytest.raises(ValueError, match="latents"):
        vae.decode(jnp.zeros((1, 6, 10, 8)))


def test_fill_report_lists_every_problem_together(ref, tmp_path):
    """The shared filler raises once, with counts, every kind of problem and the fix."""
    state = {k: v.contiguous() for k, v in ref["model"].state_dict().items()
             if not k.startswith("decoder.mid_block.")}   # 26 keys: the list is cut after 12
    state["decoder.extra.bias"] = torch.zeros(2)
    state["encoder.conv_in.weight"] = torch.zeros(32, 3, 1, 1)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError) as info:
        convert.load_vae(tmp_path / "bad.safetensors", config=TINY)
    lines = str(info.value).splitlines()
    assert lines[0].startswith(f"{tmp_path / 'bad.safetensors'}: VAE weights for VAEConfig(")
    assert lines[0].endswith("do not match the model (26 missing, 1 unexpected, 1 mis-shaped):")
    assert lines[1].startswith("  missing keys (26): decoder.mid_block.attentions.0.group_norm.")
    assert lines[1].endswith(", ... (14 more)")
    assert lines[2] == "  unexpected keys (1): decoder.extra.bias"
    assert lines[3] == ("  mis-shaped keys (1): encoder.conv_in.weight: got (32, 3, 1, 1), "
                        "expected (32, 3, 3, 3)")
    assert "load_vae(..., config=...)" in lines[4] and len(lines) == 5


def test_convert_command_writes_a_diffusers_folder(vae, ref, tmp_path):
    """`python -m ddt_jax.convert vae`: a float32 diffusers folder that loads to the same params."""
    out = tmp_path / "converted"
    cli.main(["vae", "--input", str(ref["folder"]), "--output", str(out)])
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"]
    assert_same_params(convert.load_vae(out), vae)
    config = json.loads((out / "config.json").read_text())
    assert config["scaling_factor"] == ref["model"].config.scaling_factor
    assert config["block_out_channels"] == list(TINY["block_out_channels"])
    # The current diffusers layout: the very tensors diffusers saved, and diffusers reads it back.
    written = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    original = load_file(str(ref["folder"] / "diffusion_pytorch_model.safetensors"))
    assert sorted(written) == sorted(original)
    for key, value in original.items():
        assert written[key].dtype == np.float32
        np.testing.assert_array_equal(written[key], value, err_msg=key)
    reloaded = TorchVAE.from_pretrained(out)
    assert reloaded.config.norm_num_groups == TINY["norm_num_groups"]
    # An LDM single file (plus --config for its non-SD architecture) becomes the same folder.
    ldm = tmp_path / "vae-ldm.safetensors"
    save_file(to_ldm_keys(ref["model"].state_dict(), levels=3), str(ldm))
    (tmp_path / "tiny.json").write_text(json.dumps(dict(ref["model"].config)))
    cli.main(["vae", "--input", str(ldm), "--config", str(tmp_path / "tiny.json"),
              "--output", str(tmp_path / "from_ldm")])
    assert_same_params(convert.load_vae(tmp_path / "from_ldm"), vae)
    with pytest.raises(ValueError, match="is the input folder"):
        cli.main(["vae", "--input", str(out), "--output", str(out)])


def test_convert_command_runs_as_a_module():
    for args in (["--help"], ["vae", "--help"]):
        done = subprocess.run([sys.executable, "-m", "ddt_jax.convert", *args],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "python -m ddt_jax.convert" in done.stdout

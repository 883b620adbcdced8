"""The config schema: one declaration per field, None for unset, errors that name the field."""
import pathlib

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from configs import tiny
from ddt_jax import config_schema
from ddt_jax import rng
from ddt_jax import sharding

REPO = pathlib.Path(__file__).resolve().parents[1]


def parse(*overrides, config="tiny.py"):
    """The config train.py would get from this command line."""
    argv = ["train.py", f"--config={REPO}/configs/{config}", *overrides]
    flag_values = flags.FlagValues()
    # config_flags reads the overrides from sys.argv (as train.py gets them), not from the call.
    config_flags.DEFINE_config_file("config", flag_values=flag_values, lock_config=True,
                                    sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def flat_keys(config, prefix=""):
    out = set()
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out |= flat_keys(value, f"{prefix}{key}.")
        else:
            out.add(prefix + key)
    return out


@pytest.mark.parametrize("name", ["xl_256.py", "xl_512.py", "l_256.py", "b_256.py", "tiny.py",
                                  "mnist.py"])
def test_every_recipe_has_exactly_the_schema_fields(name):
    assert flat_keys(parse(config=name)) == flat_keys(config_schema.default_config())


def test_unset_fields_are_none_and_settable_from_the_command_line():
    config = parse()
    assert config.init_from is None and config.vae.path is None
    assert config.model.image_width is None and config.peak_tflops_per_device is None
    config = parse("--config.vae.path=/weights/sd-vae", "--config.repa.projector_dim=96",
                   "--config.init_from=/ckpt/run", "--config.peak_tflops_per_device=197.5",
                   "--config.checkpoint.keep=5")
    assert (config.vae.path, config.repa.projector_dim, config.init_from) == (
        "/weights/sd-vae", 96, "/ckpt/run")
    assert config.peak_tflops_per_device == 197.5 and config.checkpoint.keep == 5
    with pytest.raises(Exception, match="projector_dim"):
        parse("--config.repa.projector_dim=wide")


def test_errors_name_the_field_and_the_fix():
    def config_with(**overrides):
        c = tiny.get_config()
        c.update_from_flattened_dict(overrides)
        return c

    with pytest.raises(ValueError, match=r"model.hidden_size=-1 must be positive, or None"):
        config_schema.validate_config(config_with(**{"model.hidden_size": -1}))
    with pytest.raises(ValueError, match=r"repa.projector_dim=0 must be positive, or None"):
        config_schema.validate_config(config_with(**{"repa.projector_dim": 0}))
    with pytest.raises(ValueError, match=r"checkpoint.keep must be positive, or None"):
        config_schema.validate_config(config_with(**{"checkpoint.keep": 0}))
    with pytest.raises(ValueError, match=r"data.flips .* needs data.source='array_record'"):
        config_schema.validate_config(config_with(**{"data.flips": True}))   # synthetic source
    for lr in (float("inf"), float("nan"), 0.0):
        with pytest.raises(ValueError, match=r"optim.lr must be positive and finite, got"):
            config_schema.validate_config(config_with(**{"optim.lr": lr}))
    c = tiny.get_config()
    with c.logging.sample.unlocked():
        c.logging.sample.steps = 10
    with pytest.raises(ValueError, match=r"section 'logging.sample': unknown fields \['steps'\]"):
        config_schema.validate_config(c)
    c = tiny.get_config()
    with c.unlocked():
        del c.flow
    with pytest.raises(ValueError, match=r"top level: missing fields \['flow'\]"):
        config_schema.validate_config(c)
    # The batch is always split over (data, fsdp): a 'batch' rule would be ignored: refused.
    with pytest.raises(ValueError, match="the batch is always split over"):
        sharding.rules_dict((("batch", ("data", "fsdp")), ("embed", "fsdp")))


def test_compile_only_config_needs_no_weight_files():
    config = parse(config="xl_256.py")
    assert config.repa.dinov2_path is None
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        config_schema.validate_config(config)
    config_schema.validate_config(config, check_files=False)


def test_rng_streams_are_distinct_names():
    groups = [("INIT", "TRAIN_EXAMPLES", "GRID_NOISE", "GRID_SAMPLER", "FID_NOISE", "FID_LABELS",
               "FID_SAMPLER"),
              ("EXAMPLE_LATENT", "EXAMPLE_T", "EXAMPLE_NOISE", "EXAMPLE_LABEL",
               "EXAMPLE_FLIP"),
              ("DUMP_SDE", "DUMP_CALIBRATE")]
    for group in groups:
        values = [getattr(rng, name) for name in group]
        assert len(set(values)) == len(values), group
    # The dump's named streams stay clear of its batch indices 0, 1, 2, ... (int32 fold_in data).
    assert min(rng.DUMP_SDE, rng.DUMP_CALIBRATE) > 10**9

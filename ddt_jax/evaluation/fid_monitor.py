"""FID during training (`logging.fid_every`): N EMA samples -> ADM's FID and IS, on the run's mesh.

Every evaluation draws the same noise and labels (streams FID_NOISE / FID_LABELS / FID_SAMPLER of
the run seed), so successive FIDs differ only by the model. The samples never leave the devices
until their Inception features do: sampling, VAE decoding and the Inception forward run sharded
over the data-parallel devices, and only pool_3 and the softmax (N x 3056 floats, 61 MB at 5,000)
are gathered. The metric code is the evaluator's (`evaluation/adm.py`), so a training-time FID of
N samples is what `evaluate.py` reports for the same N; it is biased upwards at N < 50,000
(FID-5K is not FID-50K), which is why it is named `fid_<N>` in the logs.
"""
from __future__ import annotations

import json
import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from ddt_jax import convert
from ddt_jax import rng
from ddt_jax import sampler as sampler_lib
from ddt_jax import sharding
from ddt_jax.evaluation import adm
from ddt_jax.evaluation import images as images_lib
from ddt_jax.evaluation import inception_features as features_lib

HISTORY_FILE = "fid.json"   # in the workdir: every evaluation, and the best step


def reference_statistics(path: str, net) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of pool_3 of an ADM reference batch: its stored `mu`/`sigma` (whole-train-set
    statistics, as in VIRTUAL_imagenet256_labeled.npz), else computed from its `arr_0` once (and
    cached beside the file).

    Raises:
      FileNotFoundError: no such file; ValueError: neither statistics nor images in it.
    """
    if not epath.Path(path).exists():
        raise FileNotFoundError(f"logging.fid_reference={path!r} does not exist: pass an ADM "
                                "reference batch (VIRTUAL_imagenet256_labeled.npz) or one made by "
                                "`python evaluate.py DATA --make_ref=REF.npz`")
    with epath.Path(path).open("rb") as f, np.load(f) as data:
        if "mu" in data.files and "sigma" in data.files:
            return np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
        if "arr_0" not in data.files:
            raise ValueError(f"logging.fid_reference={path!r} holds neither mu/sigma nor arr_0 "
                             f"(members: {data.files})")
    runner = features_lib.InceptionRunner(net)
    acts = features_lib.file_activations(path, runner, progress=False)
    return adm.statistics(acts.features["pool"])


class FidMonitor:
    """`monitor(ema_params) -> {"fid_<N>": ..., "inception_score_<N>": ...}` on every process.

    Args:
      config: the run config (logging.fid_*, logging.sample, model.*, seed).
      model_graphdef: the graphdef of the trained model.
      mesh: the training mesh (the samples are split over its data-parallel devices).
      vae: the VAE that decodes latents, or None for pixel models.
      net: the Inception-v3 (`convert.load_inception`).
      ref_mu: (2048,) reference mean; ref_sigma: (2048, 2048) reference covariance.
    """

    def __init__(self, config: ml_collections.ConfigDict, model_graphdef, mesh, vae, net,
                 ref_mu: np.ndarray, ref_sigma: np.ndarray):
        lg, m = config.logging, config.model
        self.config, self.model_graphdef, self.mesh = config, model_graphdef, mesh
        self.num_samples = lg.fid_num_samples
        self.batch = lg.fid_batch_size or config.global_batch_size
        sharding.check_batch_size(self.batch, mesh)
        self.ref_mu, self.ref_sigma = ref_mu, ref_sigma
        self.side = (m.image_size, m.image_width if m.image_width is not None else m.image_size)
        self.channels, self.num_classes = m.in_channels, m.num_classes
        self.vae_graphdef = self.vae_params = None
        if vae is not None:
            self.vae_graphdef, vae_state = nnx.split(vae)
            self.vae_params = sharding.host_to_replicated(vae_state.to_pure_dict(), mesh)
        self.net_graphdef, net_state = nnx.split(net)
        self.net_params = sharding.host_to_replicated(net_state.to_pure_dict(), mesh)
        rows = [sharding.batch_sharding(mesh, n) for n in (1, 2, 4)]
        self._inputs = jax.jit(self._batch_inputs, static_argnums=0,
                               out_shardings=(rows[2], rows[0], sharding.replicated(mesh)))
        self._features = jax.jit(self._decode_and_embed,
                                 out_shardings=(rows[1], rows[1], sharding.replicated(mesh)))

    def _batch_inputs(self, size: int, index):
        key = rng.stream(self.config.seed, rng.FID_NOISE)
        noise = jax.random.normal(jax.random.fold_in(key, index),
                                  (size, *self.side, self.channels), jnp.float32)
        labels = jax.random.randint(jax.random.fold_in(
            rng.stream(self.config.seed, rng.FID_LABELS), index), (size,), 0, self.num_classes)
        return noise, labels, jax.random.fold_in(rng.stream(self.config.seed, rng.FID_SAMPLER),
                                                 index)

    def _decode_and_embed(self, x, vae_params, net_params):
        finite = jnp.all(jnp.isfinite(x))
        if self.vae_graphdef is not None:
            x = nnx.merge(self.vae_graphdef, vae_params).decode(x)
        if x.shape[-1] == 1:
            x = jnp.repeat(x, 3, axis=-1)
        out = nnx.merge(self.net_graphdef, net_params)(images_lib.to_uint8(x))
        return out["pool"], out["softmax"], finite

    def features(self, ema_params) -> tuple[np.ndarray, np.ndarray]:
        """pool_3 (N, 2048) and softmax (N, 1008) of the N samples of `ema_params` (a pure dict
        on the mesh), on every process.

        Raises:
          FloatingPointError: the samples are not finite (no number is made of them).
        """
        pools, softmaxes = [], []
        model = nnx.merge(self.model_graphdef, ema_params)
        with jax.set_mesh(self.mesh):
            for index in range(math.ceil(self.num_samples / self.batch)):
                noise, labels, key = self._inputs(self.batch, index)
                x = sampler_lib.sample(model, noise, labels, self.config.logging.sample, key=key)
                pool, softmax, finite = self._features(x, self.vae_params, self.net_params)
                if not bool(np.asarray(finite.addressable_data(0))):
                    raise FloatingPointError("the EMA samples for FID came out NaN or Inf")
                pools.append(np.asarray(multihost_utils.process_allgather(pool, tiled=True)))
                softmaxes.append(np.asarray(multihost_utils.process_allgather(softmax,
                                                                              tiled=True)))
        n = self.num_samples
        return (np.concatenate(pools)[:n].astype(np.float32),
                np.concatenate(softmaxes)[:n].astype(np.float32))

    def __call__(self, ema_params) -> dict[str, float]:
        """{"fid_<N>", "inception_score_<N>"} of the N samples of `ema_params`."""
        start = time.time()
        pool, softmax = self.features(ema_params)
        n = self.num_samples
        mu, sigma = adm.statistics(pool)
        metrics = {f"fid_{n}": adm.frechet_distance(mu, sigma, self.ref_mu, self.ref_sigma),
                   f"inception_score_{n}": adm.inception_score(softmax)}
        logging.info("FID of %d EMA samples: %.3f, IS %.2f (%.0f s)", n, metrics[f"fid_{n}"],
                     metrics[f"inception_score_{n}"], time.time() - start)
        return metrics


def make_fid_monitor(config: ml_collections.ConfigDict, model_graphdef, mesh,
                     vae=None) -> FidMonitor | None:
    """The run's FID monitor, or None when logging.fid_every is 0.

    Args:
      config: the run config (`config_schema.validate_config` has checked the fid fields).
      model_graphdef: the trained model's graphdef.
      mesh: the training mesh.
      vae: the VAE of latent runs (loaded from vae.path when None and the data are latents).
    """
    lg = config.logging
    if lg.fid_every <= 0:
        return None
    if vae is None and config.data.kind == "latent":
        if not config.vae.path:
            raise ValueError("logging.fid_every > 0 on latent data needs vae.path to decode the "
                             "samples")
        vae = convert.load_vae(config.vae.path)
    net = convert.load_inception(lg.fid_inception)
    mu, sigma = reference_statistics(lg.fid_reference, net)
    return FidMonitor(config, model_graphdef, mesh, vae, net, mu, sigma)


def record(workdir: str, step: int, metrics: dict[str, float]) -> dict:
    """Adds an evaluation to <workdir>/fid.json (process 0; atomic) and returns the best so far.

    Returns:
      {"step": ..., **metrics} of the lowest FID recorded, this one included.
    """
    path = epath.Path(workdir) / HISTORY_FILE
    history = json.loads(path.read_text()) if path.exists() else {"evaluations": []}
    # A resumed run may evaluate a step again: the newest number of a step wins.
    history["evaluations"] = [e for e in history["evaluations"] if e["step"] != step]
    history["evaluations"].append({"step": step, **metrics})
    fid_key = next(k for k in metrics if k.startswith("fid_"))
    history["best"] = min((e for e in history["evaluations"] if fid_key in e),
                          key=lambda e: e[fid_key])
    if jax.process_index() == 0:
        tmp = path.parent / f".{HISTORY_FILE}.tmp"
        tmp.write_text(json.dumps(history, indent=2))
        tmp.replace(path)
    return history["best"]

"""ADM's FID Inception-v3: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` -> our NNX model.

That file is pytorch-fid's exact port of the 2015 TF graph ADM's evaluator runs
(`classify_image_graph_def.pb`), as a plain state dict (`Conv2d_1a_3x3.conv.weight`, ...,
`fc.weight`, `fc.bias`). Each of our params takes exactly one of its keys through the shared
filler; the `num_batches_tracked` counters are ignored (inference never reads them).
`convert_inception` writes a checked `.safetensors` copy that later loads without torch.

Reading ADM's TF graph (`classify_image_graph_def.pb`) itself is not supported: it would need
TensorFlow's GraphDef parsing and a map from its node names to every conv and BatchNorm constant,
and no copy of the graph could be obtained to test such a reader against, so an untested path
would only pretend to work. pytorch-fid's file holds the same weights, converted from that graph.
"""
from __future__ import annotations

import os
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from safetensors import numpy as safetensors_numpy

from ddt_jax import files
from ddt_jax.convert import fill
from ddt_jax.convert.state_dict import read_state_dict
from ddt_jax.models import inception

PTH_NAME = "pt_inception-2015-12-05-6726825d.pth"
IGNORED_SUFFIX = "num_batches_tracked"
# nnx leaf name -> torch leaf name.
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "mean": "running_mean",
                  "var": "running_var"}
_WHERE = (f"Download `{PTH_NAME}` from the releases of github.com/mseitzer/pytorch-fid "
          "(the FID Inception weights asset) yourself, then convert it once with "
          f"`python -m ddt_jax.convert inception --input={PTH_NAME} "
          "--output=inception.safetensors`; nothing is downloaded at run time.")
_HINT = (f"Expected the keys of pytorch-fid's `{PTH_NAME}` (Conv2d_1a_3x3.* ... Mixed_7c.*, fc.*), "
         "or a .safetensors written from it by `python -m ddt_jax.convert inception`.")


def torch_key(path: tuple) -> str:
    """Our param path -> its pytorch-fid key, e.g. ('Mixed_5b', 'branch1x1', 'bn', 'mean') ->
    'Mixed_5b.branch1x1.bn.running_mean'."""
    *parents, leaf = (str(p) for p in path)
    return ".".join([*parents, _LEAF_TO_TORCH.get(leaf, leaf)])


def _check_exists(path: str | os.PathLike) -> epath.Path:
    path = files.as_path(path)
    if not path.exists():
        raise FileNotFoundError(f"Inception weights {path} do not exist. {_WHERE}")
    return path


def inception_state_from_state_dict(sd: Mapping[str, np.ndarray]
                                    ) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, nnx.State of float32 numpy arrays) of `InceptionV3` from a pytorch-fid state dict.

    Missing, unexpected and mis-shaped keys are reported together in one ValueError;
    `*.num_batches_tracked` keys are ignored.
    """
    abstract = nnx.eval_shape(lambda: inception.InceptionV3(rngs=nnx.Rngs(0)))
    weights = {k: v for k, v in sd.items() if not k.endswith(IGNORED_SUFFIX)}
    state = fill.fill_params(abstract, weights, torch_key=torch_key,
                             what="Inception-v3 (pytorch-fid FID) weights", hint=_HINT)
    return nnx.graphdef(abstract), state


def inception_from_state_dict(sd: Mapping[str, np.ndarray]) -> inception.InceptionV3:
    """The `InceptionV3` module with the weights of a pytorch-fid state dict.

    Args:
      sd: {torch key: numpy array}, the keys of `pt_inception-2015-12-05-6726825d.pth`.

    Returns:
      The module; `model(images)` gives {"pool", "spatial", "softmax"}.
    """
    graphdef, state = inception_state_from_state_dict(sd)
    return nnx.merge(graphdef, jax.tree.map(jnp.asarray, state))


def load_inception(path: str | os.PathLike) -> inception.InceptionV3:
    """Loads ADM's FID Inception-v3.

    Args:
      path: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (needs torch) or a
        `.safetensors` with its keys (from `convert_inception`).

    Returns:
      The `InceptionV3` module.
    """
    return inception_from_state_dict(read_state_dict(_check_exists(path)))


def convert_inception(input_path: str | os.PathLike,
                      output_path: str | os.PathLike) -> epath.Path:
    """Checks a pytorch-fid Inception file against the model and writes it as safetensors.

    The float tensors are written as float32 under the same keys (the `num_batches_tracked`
    counters are dropped), to a temporary file that replaces `output_path` only when complete.

    Args:
      input_path: `pt_inception-2015-12-05-6726825d.pth` (or a `.safetensors`).
      output_path: the `.safetensors` file to write (local or gs://); `load_inception` reads it
        without torch.

    Returns:
      `output_path`.
    """
    output_path = files.as_path(output_path)
    if output_path.suffix != ".safetensors":
        raise ValueError(f"output {output_path} must end in .safetensors")
    sd = read_state_dict(_check_exists(input_path))
    inception_state_from_state_dict(sd)  # raises on any missing / extra / mis-shaped key
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()
               if not k.endswith(IGNORED_SUFFIX)}
    output_path.parent.mkdir(parents=True, exist_ok=True)
    data = safetensors_numpy.save(tensors)   # ~95 MB: built in memory, written atomically
    files.atomic_write(output_path, lambda f: f.write(data))
    return output_path

"""Load a local Hugging Face GPT-2 / BERT checkpoint into GPT2 / BERT (SPEC section 2).

Only local directories are read (config.json plus model.safetensors or
pytorch_model.bin, optionally sharded with an *.index.json); there is no network.
Weight layouts: GPT-2 `Conv1D` weights are [in, out] and `c_attn` fuses q|k|v along
the output; BERT `Linear` weights are [out, in]. Keys may or may not carry the
'transformer.' / 'bert.' prefix.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from stabjax.configs import DMUConfig, DTUConfig, ModelConfig
from stabjax.models.bert import BERT
from stabjax.models.gpt2 import GPT2

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all the tanh GELU

StateDict = dict[str, np.ndarray]


# --------------------------------------------------------------------------- config


def config_from_hf(hf: dict[str, Any], name: str, dtype: str = "float32",
                   scan_layers: bool = False, dmu: DMUConfig = DMUConfig(enabled=False),
                   dtu: DTUConfig = DTUConfig(enabled=False),
                   dropout_rate: float | None = None) -> ModelConfig:
  """ModelConfig from a parsed HF config.json ('gpt2' or 'bert' model_type).

  `dropout_rate=None` takes the checkpoint's (resid_pdrop / hidden_dropout_prob).
  """
  model_type = hf.get("model_type")
  common = dict(name=name, dtype=dtype, scan_layers=scan_layers, dmu=dmu, dtu=dtu)
  if hf.get("tie_word_embeddings", True) is False:
    raise ValueError(f"{name}: untied input/output embeddings are not supported")
  if model_type == "gpt2":
    act = hf.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTIVATIONS:
      raise ValueError(f"{name}: GPT-2 activation_function {act!r} is not supported; "
                       f"accepted: {', '.join(_GPT2_ACTIVATIONS)}")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("add_cross_attention"):
      raise ValueError(f"{name}: scale_attn_by_inverse_layer_idx / add_cross_attention "
                       "are not supported")
    d = hf["n_embd"]
    return ModelConfig(
        arch="gpt2", vocab_size=hf["vocab_size"], max_len=hf["n_positions"],
        num_layers=hf["n_layer"], num_heads=hf["n_head"], d_model=d,
        d_ff=hf.get("n_inner") or 4 * d, layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        dropout_rate=hf.get("resid_pdrop", 0.1) if dropout_rate is None else dropout_rate,
        **common)
  if model_type == "bert":
    if hf.get("hidden_act", "gelu") != "gelu":
      raise ValueError(f"{name}: BERT hidden_act {hf['hidden_act']!r} is not supported; "
                       "accepted: gelu")
    if hf.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError(f"{name}: only absolute position embeddings are supported")
    return ModelConfig(
        arch="bert", vocab_size=hf["vocab_size"], max_len=hf["max_position_embeddings"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        d_model=hf["hidden_size"], d_ff=hf["intermediate_size"],
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        type_vocab_size=hf.get("type_vocab_size", 2),
        dropout_rate=(hf.get("hidden_dropout_prob", 0.1) if dropout_rate is None
                      else dropout_rate),
        **common)
  raise ValueError(f"{name}: model_type {model_type!r} is not supported; accepted: gpt2, bert")


# --------------------------------------------------------------------------- weights


def _to_numpy_f32(t: Any) -> np.ndarray:
  if hasattr(t, "detach"):  # a torch tensor; bfloat16 has no NumPy dtype
    t = t.detach().float().cpu().numpy()
  return np.asarray(t, np.float32)


def _load_safetensors(file: pathlib.Path) -> StateDict:
  from safetensors.numpy import load_file
  try:
    return {k: _to_numpy_f32(v) for k, v in load_file(str(file)).items()}
  except TypeError:  # safetensors' NumPy loader has no bfloat16
    return _read_safetensors_ml_dtypes(file)


def _read_safetensors_ml_dtypes(file: pathlib.Path) -> StateDict:
  """Reads the (documented, simple) safetensors layout with ml_dtypes' bfloat16.

  Layout: u64 little-endian header size, a JSON header {name: {dtype, shape,
  data_offsets}}, then the raw little-endian data.
  """
  import ml_dtypes  # a JAX dependency

  dtypes = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
            "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
            "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
  data = file.read_bytes()
  n = int.from_bytes(data[:8], "little")
  header = json.loads(data[8:8 + n])
  header.pop("__metadata__", None)
  out: StateDict = {}
  for name, info in header.items():
    if info["dtype"] not in dtypes:
      raise ValueError(f"{file}: tensor {name} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    raw = np.frombuffer(data, dtypes[info["dtype"]], offset=8 + n + start,
                        count=(end - start) // np.dtype(dtypes[info["dtype"]]).itemsize)
    out[name] = _to_numpy_f32(raw.reshape(info["shape"]))
  return out


def _load_bin(file: pathlib.Path) -> StateDict:
  try:
    import torch
  except ImportError as e:
    raise ValueError(f"{file}: reading pytorch_model.bin needs torch; convert the checkpoint "
                     "to model.safetensors or install torch") from e
  state = torch.load(str(file), map_location="cpu", weights_only=True)
  return {k: _to_numpy_f32(v) for k, v in state.items()}


def load_state_dict(path: str | pathlib.Path) -> StateDict:
  """The checkpoint's tensors as float32 NumPy arrays, keyed as in the files."""
  path = pathlib.Path(path)
  for fname, load in (("model.safetensors", _load_safetensors),
                      ("pytorch_model.bin", _load_bin)):
    if (path / fname).is_file():
      return load(path / fname)
    index = path / f"{fname}.index.json"
    if index.is_file():
      shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
      state: StateDict = {}
      for shard in shards:
        state.update(load(path / shard))
      return state
  raise ValueError(f"{path}: no weights found; accepted files: {', '.join(WEIGHT_FILES)}")


class _Reader:
  """Looks tensors up by their unprefixed HF name and records the ones missing.

  A missing tensor reads as None, which `map` propagates, so that conversion runs to
  the end and the error names every missing tensor at once.
  """

  def __init__(self, state: StateDict, prefix: str):
    self.state = {(k[len(prefix):] if k.startswith(prefix) else k): v
                  for k, v in state.items()}
    self.missing: list[str] = []

  def __call__(self, *names: str) -> np.ndarray | None:
    for n in names:  # alternatives, e.g. LayerNorm.weight or the older LayerNorm.gamma
      if n in self.state:
        return self.state[n]
    self.missing.append(names[0])
    return None

  def map(self, fn: Callable[..., np.ndarray], *names: str) -> np.ndarray | None:
    """fn(tensor for each name), e.g. a reshape into the model's layout."""
    xs = [self(n) for n in names]
    if any(x is None for x in xs):
      return None
    try:
      return fn(*xs)
    except ValueError as e:  # a reshape that does not fit
      shapes = ", ".join(f"{n} {x.shape}" for n, x in zip(names, xs))
      raise ValueError(f"checkpoint tensors do not fit the config.json shapes: {shapes}") from e

  def layer_norm(self, name: str) -> dict[str, np.ndarray | None]:
    return {"scale": self(f"{name}.weight", f"{name}.gamma"),
            "bias": self(f"{name}.bias", f"{name}.beta")}




def convert_gpt2(state: StateDict, config: ModelConfig) -> dict[str, Any]:
  """HF GPT2LMHeadModel tensors -> unscanned GPT2 params (NumPy)."""
  r = _Reader(state, "transformer.")
  d, h, hd = config.d_model, config.num_heads, config.head_dim
  params: dict[str, Any] = {"wte": r("wte.weight"), "wpe": r("wpe.weight")}
  for i in range(config.num_layers):
    p = f"h.{i}."
    params[f"block_{i}"] = {
        "ln_1": r.layer_norm(p + "ln_1"),
        "attn": {
            # Conv1D is [in, out]; the output axis is q|k|v, each heads-major.
            "qkv_kernel": r.map(lambda w: w.reshape(d, 3, h, hd), p + "attn.c_attn.weight"),
            "qkv_bias": r.map(lambda b: b.reshape(3, h, hd), p + "attn.c_attn.bias"),
            "o_kernel": r.map(lambda w: w.reshape(h, hd, d), p + "attn.c_proj.weight"),
            "o_bias": r(p + "attn.c_proj.bias"),
        },
        "ln_2": r.layer_norm(p + "ln_2"),
        "mlp": {
            "wi_kernel": r(p + "mlp.c_fc.weight"), "wi_bias": r(p + "mlp.c_fc.bias"),
            "wo_kernel": r(p + "mlp.c_proj.weight"), "wo_bias": r(p + "mlp.c_proj.bias"),
        },
    }
  params["ln_f"] = r.layer_norm("ln_f")
  _raise_if_missing(r.missing, config)
  return params


def convert_bert(state: StateDict, config: ModelConfig) -> dict[str, Any]:
  """HF BertForMaskedLM tensors -> unscanned BERT params (NumPy)."""
  r = _Reader(state, "bert.")
  d, h, hd = config.d_model, config.num_heads, config.head_dim
  t = lambda name: r.map(np.transpose, name)  # Linear weights are [out, in]
  params: dict[str, Any] = {"embeddings": {
      "word": r("embeddings.word_embeddings.weight"),
      "position": r("embeddings.position_embeddings.weight"),
      "token_type": r("embeddings.token_type_embeddings.weight"),
      "ln": r.layer_norm("embeddings.LayerNorm"),
  }}
  for i in range(config.num_layers):
    p = f"encoder.layer.{i}."
    qkv = ("query", "key", "value")
    params[f"block_{i}"] = {
        "attn": {
            "qkv_kernel": r.map(lambda *ws: np.stack([w.T for w in ws], 1).reshape(d, 3, h, hd),
                              *(f"{p}attention.self.{n}.weight" for n in qkv)),
            "qkv_bias": r.map(lambda *bs: np.stack(bs).reshape(3, h, hd),
                            *(f"{p}attention.self.{n}.bias" for n in qkv)),
            "o_kernel": r.map(lambda w: w.T.reshape(h, hd, d), p + "attention.output.dense.weight"),
            "o_bias": r(p + "attention.output.dense.bias"),
        },
        "attn_ln": r.layer_norm(p + "attention.output.LayerNorm"),
        "mlp": {
            "wi_kernel": t(p + "intermediate.dense.weight"),
            "wi_bias": r(p + "intermediate.dense.bias"),
            "wo_kernel": t(p + "output.dense.weight"),
            "wo_bias": r(p + "output.dense.bias"),
        },
        "mlp_ln": r.layer_norm(p + "output.LayerNorm"),
    }
  params["mlm_head"] = {
      "dense": {"kernel": t("cls.predictions.transform.dense.weight"),
                "bias": r("cls.predictions.transform.dense.bias")},
      "ln": r.layer_norm("cls.predictions.transform.LayerNorm"),
      "bias": r("cls.predictions.bias", "cls.predictions.decoder.bias"),
  }
  _raise_if_missing(r.missing, config)
  return params


def _raise_if_missing(missing: list[str], config: ModelConfig) -> None:
  if missing:
    shown = ", ".join(missing[:10]) + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
    raise ValueError(f"{config.name}: {len(missing)} expected tensors not in the checkpoint: "
                     f"{shown}")


def stack_layers(params: dict[str, Any], num_layers: int) -> dict[str, Any]:
  """'block_0'..'block_{L-1}' -> one 'layers' subtree with a leading [L] axis."""
  blocks = [params[f"block_{i}"] for i in range(num_layers)]
  out = {k: v for k, v in params.items() if not k.startswith("block_")}
  out["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *blocks)
  return out


def unstack_layers(params: dict[str, Any]) -> dict[str, Any]:
  """Inverse of `stack_layers`."""
  layers = params["layers"]
  num_layers = jax.tree.leaves(layers)[0].shape[0]
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(num_layers):
    out[f"block_{i}"] = jax.tree.map(lambda x: x[i], layers)
  return out


def check_shapes(params: Any, expected: Any, name: str) -> None:
  """ValueError (one line, up to 10 entries) unless `params` has `expected`'s tree and shapes."""
  got = jax.tree_util.tree_flatten_with_path(params)[0]
  want = jax.tree_util.tree_flatten_with_path(expected)[0]
  got_d = {jax.tree_util.keystr(k): v.shape for k, v in got}
  want_d = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in want}
  errors = [f"{k}: missing" for k in want_d if k not in got_d]
  errors += [f"{k}: unexpected" for k in got_d if k not in want_d]
  errors += [f"{k}: checkpoint {got_d[k]} != model {s}" for k, s in want_d.items()
             if k in got_d and got_d[k] != s]
  if errors:
    raise ValueError(f"{name}: checkpoint does not fit the model: " + "; ".join(errors[:10]))


def read_config(path: str | pathlib.Path) -> dict[str, Any]:
  """A checkpoint directory's parsed config.json; ValueError (one line) when `path` is no
  directory, has no config.json or no weights file."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise ValueError(f"{path}: no such directory (expected a Hugging Face checkpoint "
                     f"directory with config.json and one of {', '.join(WEIGHT_FILES)})")
  config_file = path / "config.json"
  if not config_file.is_file():
    raise ValueError(f"{path}: not a Hugging Face checkpoint directory (no config.json); "
                     f"expected config.json and one of {', '.join(WEIGHT_FILES)}")
  if not any((path / f).is_file() for f in WEIGHT_FILES):
    raise ValueError(f"{path}: no weights found; accepted files: {', '.join(WEIGHT_FILES)}")
  try:
    return json.loads(config_file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_file}: not valid JSON ({e.msg} at line {e.lineno})") from None


def model_and_expected(config: ModelConfig) -> tuple[nn.Module, Any]:
  """The module of `config` and its params' shapes (abstract, no allocation)."""
  model = GPT2(config) if config.arch == "gpt2" else BERT(config)
  expected = jax.eval_shape(
      lambda k: nn.meta.unbox(model.init({"params": k}, jnp.zeros((1, 2), jnp.int32))["params"]),
      jax.random.key(0))
  return model, expected


def load_params(path: str | pathlib.Path, config: ModelConfig) -> dict[str, Any]:
  """The checkpoint's weights as `config`'s float32 NumPy params tree (stacked under
  'layers' when `config.scan_layers`); ValueError (one line) when they do not fit."""
  state = load_state_dict(path)
  params = (convert_gpt2 if config.arch == "gpt2" else convert_bert)(state, config)
  if config.scan_layers:
    params = stack_layers(params, config.num_layers)
  check_shapes(params, model_and_expected(config)[1], config.name)
  return params


def from_pretrained(path: str | pathlib.Path, dmu: DMUConfig = DMUConfig(enabled=False),
                    dtu: DTUConfig = DTUConfig(enabled=False), scan_layers: bool = False,
                    dtype: str = "float32", dropout_rate: float | None = None
                    ) -> tuple[nn.Module, dict[str, Any]]:
  """(model, params) from a local HF GPT-2 / BERT checkpoint directory.

  Args:
    path: a directory with config.json and model.safetensors (or pytorch_model.bin,
      which needs torch; sharded *.index.json variants are read too).
    dmu, dtu: the stochastic units' configuration (off by default: the exact HF model).
    scan_layers: stack the blocks under 'layers' for `nn.scan`.
    dtype: compute dtype; params are float32 whatever the checkpoint's dtype.
    dropout_rate: None takes the checkpoint's rate.

  Returns:
    The GPT2 / BERT module and its unboxed float32 'params' tree.
  """
  path = pathlib.Path(path)
  config = config_from_hf(read_config(path), f"hf:{path.resolve().name}",
                          dtype=dtype, scan_layers=scan_layers, dmu=dmu, dtu=dtu,
                          dropout_rate=dropout_rate)
  params = load_params(path, config)
  model = GPT2(config) if config.arch == "gpt2" else BERT(config)
  return model, jax.tree.map(jnp.asarray, params)


# --------------------------------------------------------------------------- export
# The inverse direction: stabjax params -> a Hugging Face checkpoint (experiments/export.py).


def fold_dmu_eval(params: dict[str, Any], config: ModelConfig) -> dict[str, Any]:
  """Unscanned params whose plain MLP equals the DMU's evaluation-mode map.

  At evaluation (`deterministic=True`, models/dmu.py) a DMU with `rescale=False` and
  c~ < 1 multiplies its masked quantities by their keep probabilities p (`dmu_scales`):
  edge modes x @ (p wi) + p bi and h @ (p wo) + p bo; node modes x -> p_in x,
  act(.) -> p_h act(.), output -> p_out (.). Each factor sits on a linear map, so it
  folds exactly into the weights: edge modes scale wi, bi, wo, bo by their p; node modes
  scale wi by p_in, wo by p_h p_out and bo by p_out (bi is untouched: p_in scales x
  before the bias is added). `rescale=True` (identity at evaluation),
  c~ = 1 or a disabled DMU: unchanged. The DTU's evaluation mode is exact attention,
  which needs nothing. Loading the result with the DMU on again would scale twice.
  """
  from stabjax.models.dmu import dmu_scales
  dmu = config.dmu
  if not dmu.enabled or dmu.c_tilde == 1.0:
    return params
  s = dmu_scales(dmu, config.d_model, config.d_ff, deterministic=True)
  if "wi_kernel" in s:
    factors = {n: s[n] for n in ("wi_kernel", "wi_bias", "wo_kernel", "wo_bias")}
  else:
    factors = {"wi_kernel": s["input"], "wo_kernel": s["hidden"] * s["output"],
               "wo_bias": s["output"]}
  out = dict(params)
  for i in range(config.num_layers):
    block = dict(out[f"block_{i}"])
    block["mlp"] = {k: (np.asarray(v) * np.float32(factors[k]) if k in factors
                        else np.asarray(v)) for k, v in block["mlp"].items()}
    out[f"block_{i}"] = block
  return out


def export_state_dict(params: dict[str, Any], config: ModelConfig) -> StateDict:
  """stabjax params (scanned or not) -> the HF GPT2LMHeadModel / BertForMaskedLM tensors
  of the model's evaluation mode (the inverse of `convert_gpt2` / `convert_bert`, with
  `fold_dmu_eval`). Tied output weights are written too (lm_head, cls decoder)."""
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  if "layers" in params:
    params = unstack_layers(params)
  params = fold_dmu_eval(params, config)
  d = config.d_model
  ln = lambda name, p: {f"{name}.weight": p["scale"], f"{name}.bias": p["bias"]}  # noqa: E731
  out: StateDict = {}
  if config.arch == "gpt2":
    out["transformer.wte.weight"] = params["wte"]
    out["transformer.wpe.weight"] = params["wpe"]
    for i in range(config.num_layers):
      b, p = params[f"block_{i}"], f"transformer.h.{i}."
      a, m = b["attn"], b["mlp"]
      out.update(ln(p + "ln_1", b["ln_1"]))
      out.update(ln(p + "ln_2", b["ln_2"]))
      out.update({
          p + "attn.c_attn.weight": a["qkv_kernel"].reshape(d, 3 * d),
          p + "attn.c_attn.bias": a["qkv_bias"].reshape(3 * d),
          p + "attn.c_proj.weight": a["o_kernel"].reshape(d, d),
          p + "attn.c_proj.bias": a["o_bias"],
          p + "mlp.c_fc.weight": m["wi_kernel"], p + "mlp.c_fc.bias": m["wi_bias"],
          p + "mlp.c_proj.weight": m["wo_kernel"], p + "mlp.c_proj.bias": m["wo_bias"],
      })
    out.update(ln("transformer.ln_f", params["ln_f"]))
    out["lm_head.weight"] = params["wte"]
  else:
    e = params["embeddings"]
    out.update({"bert.embeddings.word_embeddings.weight": e["word"],
                "bert.embeddings.position_embeddings.weight": e["position"],
                "bert.embeddings.token_type_embeddings.weight": e["token_type"]})
    out.update(ln("bert.embeddings.LayerNorm", e["ln"]))
    for i in range(config.num_layers):
      b, p = params[f"block_{i}"], f"bert.encoder.layer.{i}."
      a, m = b["attn"], b["mlp"]
      qkv, qkv_b = a["qkv_kernel"].reshape(d, 3, d), a["qkv_bias"].reshape(3, d)
      for j, n in enumerate(("query", "key", "value")):
        out[f"{p}attention.self.{n}.weight"] = qkv[:, j].T
        out[f"{p}attention.self.{n}.bias"] = qkv_b[j]
      out.update({
          p + "attention.output.dense.weight": a["o_kernel"].reshape(d, d).T,
          p + "attention.output.dense.bias": a["o_bias"],
          p + "intermediate.dense.weight": m["wi_kernel"].T,
          p + "intermediate.dense.bias": m["wi_bias"],
          p + "output.dense.weight": m["wo_kernel"].T, p + "output.dense.bias": m["wo_bias"],
      })
      out.update(ln(p + "attention.output.LayerNorm", b["attn_ln"]))
      out.update(ln(p + "output.LayerNorm", b["mlp_ln"]))
    h = params["mlm_head"]
    out.update({"cls.predictions.transform.dense.weight": h["dense"]["kernel"].T,
                "cls.predictions.transform.dense.bias": h["dense"]["bias"],
                "cls.predictions.bias": h["bias"], "cls.predictions.decoder.bias": h["bias"],
                "cls.predictions.decoder.weight": e["word"]})
    out.update(ln("cls.predictions.transform.LayerNorm", h["ln"]))
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def hf_config(config: ModelConfig, bos_id: int | None = None, eos_id: int | None = None,
              pad_id: int | None = None) -> dict[str, Any]:
  """The config.json of the exported model (the inverse of `config_from_hf`)."""
  ids = {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
  if config.arch == "gpt2":
    p = config.dropout_rate
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "vocab_size": config.vocab_size, "n_positions": config.max_len,
            "n_embd": config.d_model, "n_layer": config.num_layers, "n_head": config.num_heads,
            "n_inner": config.d_ff, "activation_function": "gelu_new",
            "layer_norm_epsilon": config.layer_norm_eps, "resid_pdrop": p, "embd_pdrop": p,
            "attn_pdrop": p, "tie_word_embeddings": True, **ids}
  return {"model_type": "bert", "architectures": ["BertForMaskedLM"],
          "vocab_size": config.vocab_size, "max_position_embeddings": config.max_len,
          "hidden_size": config.d_model, "num_hidden_layers": config.num_layers,
          "num_attention_heads": config.num_heads, "intermediate_size": config.d_ff,
          "hidden_act": "gelu", "layer_norm_eps": config.layer_norm_eps,
          "type_vocab_size": config.type_vocab_size,
          "hidden_dropout_prob": config.dropout_rate,
          "attention_probs_dropout_prob": config.dropout_rate,
          "position_embedding_type": "absolute", "tie_word_embeddings": True, **ids}


def save_hf(params: dict[str, Any], config: ModelConfig, out: str | pathlib.Path,
            bos_id: int | None = None, eos_id: int | None = None,
            pad_id: int | None = None) -> list[str]:
  """Writes config.json and model.safetensors of `params` to `out` (created); the names."""
  from safetensors.numpy import save_file
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  state = export_state_dict(params, config)
  (out / "config.json").write_text(json.dumps(hf_config(config, bos_id, eos_id, pad_id),
                                              indent=2))
  save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
  return ["config.json", "model.safetensors"]

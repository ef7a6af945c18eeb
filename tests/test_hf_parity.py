"""Logits of GPT2 / BERT loaded with `from_pretrained` match Hugging Face's (SPEC 2)."""

from __future__ import annotations

import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from stabjax.models import from_pretrained  # noqa: E402
from stabjax.models.hf import load_state_dict  # noqa: E402

VOCAB, T, B = 97, 12, 3
TOL = 1e-4


def _perturb(model) -> None:
  """Random values everywhere (HF inits biases to 0 and LN to 1, which hides mix-ups)."""
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _save(model, path: pathlib.Path, bin_format: bool = False) -> pathlib.Path:
  if bin_format:
    # transformers 5 always writes safetensors, so write the legacy file by hand.
    path.mkdir(parents=True)
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
  else:
    model.save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB,
                                n_positions=32, bos_token_id=0, eos_token_id=0)
  model = transformers.GPT2LMHeadModel(cfg).eval()
  _perturb(model)
  return model, _save(model, tmp_path_factory.mktemp("hf") / "tiny-gpt2")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
  torch.manual_seed(0)
  cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128, vocab_size=VOCAB,
                                max_position_embeddings=32, type_vocab_size=3)
  model = transformers.BertForMaskedLM(cfg).eval()
  _perturb(model)
  return model, _save(model, tmp_path_factory.mktemp("hf") / "tiny-bert")


def _ids(seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, VOCAB, (B, T))


def _hf_logits(model, **kw) -> np.ndarray:
  with torch.no_grad():
    kw = {k: torch.from_numpy(np.asarray(v, np.int64)) for k, v in kw.items()}
    return model(**kw).logits.numpy()


@pytest.mark.parametrize("scan_layers", [False, True])
def test_gpt2_logits_match(gpt2_dir, scan_layers):
  hf_model, path = gpt2_dir
  model, params = from_pretrained(path, scan_layers=scan_layers)
  assert model.config.name == "hf:tiny-gpt2"
  assert ("layers" in params) == scan_layers
  ids = _ids(0)
  logits = model.apply({"params": params}, jnp.asarray(ids))
  chex.assert_shape(logits, (B, T, VOCAB))
  np.testing.assert_allclose(logits, _hf_logits(hf_model, input_ids=ids), atol=TOL, rtol=0)


def test_gpt2_pytorch_bin_loads(gpt2_dir, tmp_path):
  hf_model, _ = gpt2_dir
  path = _save(hf_model, tmp_path / "bin", bin_format=True)
  assert not (path / "model.safetensors").exists()
  model, params = from_pretrained(path)
  ids = _ids(1)
  np.testing.assert_allclose(model.apply({"params": params}, jnp.asarray(ids)),
                             _hf_logits(hf_model, input_ids=ids), atol=TOL, rtol=0)


def test_gpt2_without_prefix_loads(gpt2_dir, tmp_path):
  """The original OpenAI-converted checkpoints have no 'transformer.' prefix."""
  hf_model, _ = gpt2_dir
  path = tmp_path / "noprefix"
  path.mkdir()
  hf_model.config.save_pretrained(path)
  state = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items()}
  torch.save(state, path / "pytorch_model.bin")
  model, params = from_pretrained(path)
  ids = _ids(2)
  np.testing.assert_allclose(model.apply({"params": params}, jnp.asarray(ids)),
                             _hf_logits(hf_model, input_ids=ids), atol=TOL, rtol=0)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_bert_logits_match_with_padding_and_types(bert_dir, scan_layers):
  hf_model, path = bert_dir
  model, params = from_pretrained(path, scan_layers=scan_layers)
  assert model.config.layer_norm_eps == 1e-12 and model.config.type_vocab_size == 3
  ids = _ids(3)
  types = np.random.default_rng(4).integers(0, 3, (B, T))
  lengths = np.array([T, T - 4, 5])
  mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int64)
  ours = model.apply({"params": params}, jnp.asarray(ids), token_type_ids=jnp.asarray(types),
                     attention_mask=jnp.asarray(mask))
  ref = _hf_logits(hf_model, input_ids=ids, token_type_ids=types, attention_mask=mask)
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(ours)[real], ref[real], atol=TOL, rtol=0)


def test_bert_pytorch_bin_loads(bert_dir, tmp_path):
  """A .bin state dict also holds the tied decoder weight/bias; they are ignored."""
  hf_model, _ = bert_dir
  path = _save(hf_model, tmp_path / "bin", bin_format=True)
  model, params = from_pretrained(path)
  ids = _ids(5)
  np.testing.assert_allclose(model.apply({"params": params}, jnp.asarray(ids)),
                             _hf_logits(hf_model, input_ids=ids), atol=TOL, rtol=0)


def test_loaded_params_equal_checkpoint_tensors(gpt2_dir):
  """Exact layout: the fused c_attn [d, 3d] splits into [d, 3, H, Dh] q|k|v heads-major."""
  _, path = gpt2_dir
  state = load_state_dict(path)
  _, params = from_pretrained(path)
  w = state["transformer.h.1.attn.c_attn.weight"]
  qkv = np.asarray(params["block_1"]["attn"]["qkv_kernel"])
  # k (index 1) of head 2 is columns d + 2 * Dh .. d + 3 * Dh of the fused matrix.
  np.testing.assert_array_equal(qkv[:, 1, 2, :], w[:, 64 + 32:64 + 48])
  np.testing.assert_array_equal(params["wte"], state["transformer.wte.weight"])
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_bfloat16_checkpoint_loads_as_float32(gpt2_dir, tmp_path):
  """safetensors' NumPy loader has no bfloat16; the fallback reader needs no torch."""
  hf_model, _ = gpt2_dir
  low = transformers.GPT2LMHeadModel(hf_model.config)
  low.load_state_dict(hf_model.state_dict())
  low.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
  _, params = from_pretrained(tmp_path / "bf16")
  want = low.transformer.h[0].mlp.c_fc.weight.detach().float().numpy()
  assert params["block_0"]["mlp"]["wi_kernel"].dtype == jnp.float32
  np.testing.assert_array_equal(params["block_0"]["mlp"]["wi_kernel"], want)
  assert not np.array_equal(want, hf_model.transformer.h[0].mlp.c_fc.weight.detach().numpy())


def test_errors_name_the_problem(gpt2_dir, tmp_path):
  _, path = gpt2_dir
  with pytest.raises(ValueError, match="config.json"):
    from_pretrained(tmp_path)
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  with pytest.raises(ValueError, match=r"model\.safetensors.*pytorch_model\.bin"):
    from_pretrained(tmp_path)
  # A checkpoint without its last block: every missing tensor of block 1 is reported.
  state = {k: torch.from_numpy(v) for k, v in load_state_dict(path).items() if ".h.1." not in k}
  torch.save(state, tmp_path / "pytorch_model.bin")
  with pytest.raises(ValueError, match=r"12 expected tensors.*h\.1\.ln_1\.weight"):
    from_pretrained(tmp_path)
  # A config.json that disagrees with the tensors.
  cfg = json.loads((path / "config.json").read_text())
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "config.json").write_text(json.dumps({**cfg, "n_positions": 16}))
  torch.save({k: torch.from_numpy(v) for k, v in load_state_dict(path).items()},
             bad / "pytorch_model.bin")
  with pytest.raises(ValueError, match=r"\['wpe'\]: checkpoint \(32, 64\) != model \(16, 64\)"):
    from_pretrained(bad)

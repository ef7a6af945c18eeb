"""Hugging Face in and out: --init_from a local GPT-2 + tokenizer, fine-tune, export, and
transformers loads the export with stabjax's evaluation-mode logits (issue 15, items 1-2).

Every checkpoint and tokenizer here is made by the test (random weights, a BPE trained on
a few KB of text it writes), offline.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from stabjax import workdir as workdir_lib  # noqa: E402
from stabjax.configs import DMUConfig, DTUConfig, ModelConfig  # noqa: E402
from stabjax.data import DataConfig, load_dataset  # noqa: E402
from stabjax.data.tokenizer import HFTokenizer  # noqa: E402
from stabjax.models import get_model, hf  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4
WORDS = ("the cat sat on a mat and dog ran far away from home with big red ball it was "
         "good very small house tree").split()
TEXT = "the cat sat on a mat. the dog ran far away from home"


def write_corpus(path, docs=60, seed=0) -> str:
  """A few KB of documents (blank-line separated) of random sentences over WORDS."""
  rng = random.Random(seed)
  text = "\n\n".join("\n".join(" ".join(rng.choice(WORDS) for _ in range(10)) + "."
                               for _ in range(4)) for _ in range(docs))
  path.write_text(text)
  return str(path)


def make_gpt2_dir(root, corpus, n_positions=64, pad=True, vocab_files=False):
  """A random tiny GPT2LMHeadModel with its own byte-level BPE, saved as HF does."""
  specials = ["<|endoftext|>"] + (["<pad>"] if pad else [])
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train([corpus], vocab_size=400, special_tokens=specials, show_progress=False)
  kw = {"pad_token": "<pad>"} if pad else {}
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer,
                                             bos_token="<|endoftext|>",
                                             eos_token="<|endoftext|>", **kw)
  root.mkdir(parents=True)
  tok.save_pretrained(root)
  if vocab_files:  # the older layout: vocab.json + merges.txt, no tokenizer.json
    bpe.save_model(str(root))
    os.remove(root / "tokenizer.json")
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=32,
                                n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
  transformers.GPT2LMHeadModel(cfg).save_pretrained(root)
  return root


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf_io")
  corpus = write_corpus(root / "corpus.txt")
  return root, corpus, make_gpt2_dir(root / "tiny-gpt2", corpus)


def launcher(name, *args, timeout=400):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.run([sys.executable, os.path.join(REPO, "experiments", name), *args],
                        capture_output=True, text=True, timeout=timeout, env=env)


def run_flags(root, corpus):
  # Small and quick; the DTU samples 8 of 32 keys and the DMU (dfix, c~ 0.5) is on.
  return [f"--data=text:{corpus}", f"--cache_dir={root / 'cache'}", "--steps=3",
          "--batch_size=4", "--seq_len=32", "--eval_every=3", "--eval_batches=1",
          "--checkpoint_every=3", "--progress=false", "--num_samples=4", "--max_new_tokens=8",
          "--decoders=sample,greedy", "--eval_gen_prompts=0", "--alpha=0.1", "--dtu_keep=8",
          "--warmup_steps=1"]


@pytest.fixture(scope="module")
def gpt2_run(hf_dirs):
  """init_from the tiny GPT-2 -> 3 steps -> export."""
  root, corpus, model_dir = hf_dirs
  wd, out = root / "run", root / "export"
  proc = launcher("main.py", f"--workdir={wd}", f"--init_from={model_dir}",
                  *run_flags(root, corpus))
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = launcher("export.py", f"--workdir={wd}", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return wd, out, model_dir


def stabjax_eval_logits(wd, ids):
  cfg = workdir_lib.load_config(str(wd))
  tok = workdir_lib.run_tokenizer(cfg)
  _, trainer, params = workdir_lib.restore_params(str(wd), cfg, tok)
  x = jnp.asarray(ids)[None]
  return cfg, params, np.asarray(trainer.model.apply({"params": params}, x, deterministic=True))


def test_init_from_train_export_loads_in_transformers_with_equal_logits(gpt2_run):
  wd, out, model_dir = gpt2_run
  cfg = json.loads((wd / "config.json").read_text())
  assert cfg["init_from"] == str(model_dir)
  assert cfg["model"]["name"] == "hf:tiny-gpt2" and cfg["model"]["d_model"] == 32
  assert cfg["model"]["dmu"]["enabled"] and cfg["model"]["dtu"]["keep"] == 8
  # The run's tokenizer is the checkpoint's, and so is the exported one.
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  ids = hf_tok(TEXT)["input_ids"]
  assert ids == HFTokenizer(model_dir).encode(TEXT)
  model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert isinstance(model, transformers.GPT2LMHeadModel)
  with torch.no_grad():
    got = model(torch.tensor([ids])).logits.numpy()
  run_cfg, params, want = stabjax_eval_logits(wd, ids)
  err = float(np.abs(got - want).max())
  print(f"exported GPT-2 vs stabjax eval logits: max abs diff {err:.2e}")
  assert err < TOL
  # The run trained away from the checkpoint ...
  start = hf.load_params(model_dir, run_cfg.model)
  assert not np.allclose(np.asarray(params["wte"]), start["wte"], atol=1e-6)
  # ... and the DMU's evaluation scaling was folded in: the raw weights give other logits.
  raw = get_model(run_cfg.model.replace(dmu=DMUConfig(enabled=False)))
  unfolded = np.asarray(raw.apply({"params": params}, jnp.asarray(ids)[None]))
  assert np.abs(unfolded - want).max() > 1e-2


def test_sample_continues_a_prompt_as_transformers_greedy_does(gpt2_run):
  wd, out, _ = gpt2_run
  proc = launcher("sample.py", f"--workdir={wd}", "--prompt=the cat", "--decoder=greedy",
                  "--num=2", "--max_new_tokens=6")
  assert proc.returncode == 0, proc.stderr[-2000:]
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  prompt = [hf_tok.bos_token_id] + hf_tok("the cat")["input_ids"]
  with torch.no_grad():
    gen = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                         eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id)
  cont = gen[0, len(prompt):].tolist()
  if hf_tok.eos_token_id in cont:
    cont = cont[:cont.index(hf_tok.eos_token_id)]
  text = hf_tok.decode(cont, skip_special_tokens=True)  # may hold newlines
  # Greedy: both rows alike, and what transformers' greedy search continues with.
  assert f"\n[0] the cat ‖ {text}\n[1] the cat ‖ {text}\n" in proc.stdout, proc.stdout


def test_resume_with_another_init_from_is_refused(gpt2_run, tmp_path):
  wd, _, model_dir = gpt2_run
  other = tmp_path / "other-gpt2"
  shutil.copytree(model_dir, other)
  before = sorted(os.listdir(wd))
  proc = launcher("main.py", f"--workdir={wd}", f"--init_from={other}",
                  *run_flags(wd.parent, wd.parent / "corpus.txt"))
  assert proc.returncode != 0
  assert "init_from" in proc.stderr and "Traceback" not in proc.stderr
  assert sorted(os.listdir(wd)) == before


# Each case is a launcher start (~10 s of imports): the rarer ones only with -m slow.
@pytest.mark.parametrize("case", ["missing", pytest.param("no_config", marks=pytest.mark.slow),
                                  "no_weights", "model_type", "seq_len",
                                  pytest.param("synthetic", marks=pytest.mark.slow),
                                  pytest.param("model_flag", marks=pytest.mark.slow)])
def test_bad_init_from_is_one_line_and_writes_nothing(hf_dirs, tmp_path, case):
  root, corpus, model_dir = hf_dirs
  bad = tmp_path / "bad"
  args = run_flags(tmp_path, corpus)
  init, expect = str(bad), None
  if case == "missing":
    expect = "no such directory"
  elif case == "no_config":
    bad.mkdir()
    expect = "no config.json"
  elif case == "no_weights":
    bad.mkdir()
    shutil.copy(model_dir / "config.json", bad)
    expect = "no weights found"
  elif case == "model_type":
    shutil.copytree(model_dir, bad)
    (bad / "config.json").write_text(json.dumps({"model_type": "llama"}))
    expect = "model_type 'llama' is not supported"
  elif case == "seq_len":
    init, expect = str(model_dir), "--seq_len=128 exceeds the 64 positions"
    args.append("--seq_len=128")
  elif case == "synthetic":
    init, expect = str(model_dir), "needs text: or tfds: data"
    args.append("--data=synthetic")
  else:
    init, expect = str(model_dir), "--model does not apply with --init_from"
    args.append("--model=gpt2_nano")
  wd = tmp_path / "wd"
  proc = launcher("main.py", f"--workdir={wd}", f"--init_from={init}", *args, timeout=120)
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], proc.stderr
  assert not wd.exists()


# ------------------------------------------------------------------ in-process pieces


def test_init_params_replace_the_random_init_with_the_run_shardings(hf_dirs):
  from stabjax.train import RunConfig, SpecialIds, Trainer
  _, _, model_dir = hf_dirs
  model = hf.config_from_hf(hf.read_config(model_dir), "hf:tiny", scan_layers=True,
                            dmu=DMUConfig(), dtu=DTUConfig(keep=4))
  start = hf.load_params(model_dir, model)
  cfg = RunConfig(model=model, init_from=str(model_dir))
  trainer = Trainer.create(cfg, SpecialIds(pad=1, bos=0, eos=0, mask=1), init_params=start)
  state = trainer.init_state()
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state.params,
               start)
  jax.tree.map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim) or pytest.fail(str(s)),
               state.params, trainer.state_shardings.params)
  bad = dict(start, wpe=start["wpe"][:10])
  with pytest.raises(ValueError, match=r"\['wpe'\]: checkpoint \(10, 32\) != model \(64, 32\)"):
    Trainer.create(cfg, SpecialIds(pad=1, bos=0, eos=0, mask=1), init_params=bad)


@pytest.mark.parametrize("arch,mode,rescale,scan", [
    ("gpt2", "dfix", False, False), ("gpt2", "dmu2_prob", False, True),
    ("bert", "dprob", False, True), ("bert", "dmu2_fix", False, False),
    ("bert", "dfix", True, False)])
def test_export_matches_transformers_for_every_dmu_mode(tmp_path, arch, mode, rescale, scan):
  """Random (non-trivial) params of each arch and DMU mode: exported logits equal stabjax's
  evaluation-mode logits in GPT2LMHeadModel / BertForMaskedLM."""
  cfg = ModelConfig(name="t", arch=arch, vocab_size=53, max_len=16, num_layers=2, num_heads=2,
                    d_model=16, d_ff=40, layer_norm_eps=1e-5 if arch == "gpt2" else 1e-12,
                    scan_layers=scan, type_vocab_size=2,
                    dmu=DMUConfig(enabled=True, c_tilde=0.6, mode=mode, rescale=rescale),
                    dtu=DTUConfig(enabled=True, keep=3))
  model, shapes = hf.model_and_expected(cfg)
  x = jnp.asarray(np.random.RandomState(0).randint(0, 53, (2, 10)))
  rng = np.random.RandomState(3)  # NumPy from the abstract shapes: nothing to compile
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: (float("scale" in jax.tree_util.keystr(path))
                       + 0.2 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  want = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x, deterministic=True))(
      params, x))
  hf.save_hf(params, cfg, tmp_path / "out", bos_id=1, eos_id=2, pad_id=0)
  cls = transformers.GPT2LMHeadModel if arch == "gpt2" else transformers.BertForMaskedLM
  loaded = cls.from_pretrained(tmp_path / "out").eval()
  with torch.no_grad():
    got = loaded(torch.tensor(np.asarray(x))).logits.numpy()
  assert np.abs(want).max() > 0.5  # logits far from trivially equal
  assert np.abs(got - want).max() < TOL
  # Without the DMU (or with rescale) the export is the exact inverse of the import.
  if rescale:
    back, _ = jax.tree.flatten(hf.load_params(tmp_path / "out", cfg))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), back,
                 jax.tree.leaves(params))


# ------------------------------------------------------------------- the tokenizer


def test_hf_tokenizer_files_and_special_ids(hf_dirs, tmp_path):
  root, corpus, model_dir = hf_dirs
  tok = HFTokenizer(model_dir)
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id) == (0, 0, 1, 1)
  assert tok.vocab_size == tok.num_tokens == json.loads(
      (model_dir / "config.json").read_text())["vocab_size"]
  assert tok.decode(tok.encode(TEXT)) == TEXT
  # vocab.json + merges.txt (no tokenizer.json) tokenize alike.
  legacy = make_gpt2_dir(tmp_path / "legacy", corpus, vocab_files=True)
  assert not (legacy / "tokenizer.json").exists()
  assert HFTokenizer(legacy).encode(TEXT) == tok.encode(TEXT)
  # No pad token: a padded model vocabulary gives the spare id (decoded as nothing) ...
  nopad = make_gpt2_dir(tmp_path / "nopad", corpus, pad=False)
  n = HFTokenizer(nopad, model_vocab_size=512).num_tokens
  padded = HFTokenizer(nopad, model_vocab_size=512)
  assert padded.pad_id == n and padded.vocab_size == 512 and padded.eos_id == 0
  assert padded.decode(padded.encode(TEXT) + [n, n]) == TEXT
  # ... and without one there is no id to pad with.
  with pytest.raises(ValueError, match="no pad token other than BOS/EOS"):
    HFTokenizer(nopad)
  with pytest.raises(ValueError, match=f"has {n} tokens, more than the model's 100-entry"):
    HFTokenizer(nopad, model_vocab_size=100)


def test_bert_wordpiece_tokenizer_from_vocab_txt(hf_dirs, tmp_path):
  _, corpus, _ = hf_dirs
  wp = tokenizers.BertWordPieceTokenizer(lowercase=True)
  wp.train([corpus], vocab_size=200, show_progress=False,
           special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
  (tmp_path / "bert").mkdir()
  wp.save_model(str(tmp_path / "bert"))
  tok = HFTokenizer(tmp_path / "bert", model_type="bert")
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 2, 3, 4)
  ids = tok.encode("The Cat sat.")
  assert tok.bos_id not in ids and tok.decode(ids) == "the cat sat."


def test_sentencepiece_exports_as_a_transformers_tokenizer(hf_dirs, tmp_path):
  from stabjax.data.tokenizer import (SentencePieceTokenizer, export_hf_tokenizer,
                                      train_sentencepiece)
  _, corpus, _ = hf_dirs
  text = open(corpus).read()
  sp = SentencePieceTokenizer(train_sentencepiece(
      [line for line in text.split("\n") if line.strip()], 300, "bpe"))
  assert export_hf_tokenizer(sp, tmp_path).startswith("sentencepiece converted")
  fast = transformers.AutoTokenizer.from_pretrained(tmp_path)
  docs = text.split("\n\n")[:20] + ["  Two  spaces,\n\nnew [MASK] lines and émigré 🙂 "]
  for doc in docs:
    ids = fast(doc, add_special_tokens=False)["input_ids"]
    assert ids == sp.encode(doc), doc
    assert fast.decode(ids) == sp.decode(ids)
  assert (fast.pad_token_id, fast.bos_token_id, fast.eos_token_id) == (
      sp.pad_id, sp.bos_id, sp.eos_id)
  assert fast.convert_tokens_to_ids("[MASK]") == sp.mask_id
  assert (tmp_path / "tokenizer.model").read_bytes() == sp.model_proto


def test_dataset_cache_is_keyed_by_the_tokenizer(hf_dirs, tmp_path):
  _, corpus, model_dir = hf_dirs
  data = DataConfig(spec=f"text:{corpus}", seq_len=32, vocab_size=300,
                    cache_dir=str(tmp_path / "cache"))
  tok = HFTokenizer(model_dir)
  ds = load_dataset(data, tokenizer=tok)
  assert ds.tokenizer is tok
  rows = np.asarray(ds.train.tokens)
  assert rows[0, 0] == tok.bos_id and rows.max() < tok.num_tokens
  first_doc = ds.validation_texts()[0]
  val = np.asarray(ds.validation.tokens).ravel()
  assert val[1:1 + 5].tolist() == tok.encode(first_doc)[:5]
  sp = load_dataset(data)  # SentencePiece beside it, in its own folder
  assert type(sp.tokenizer).__name__ == "SentencePieceTokenizer"
  other = HFTokenizer(model_dir, model_vocab_size=tok.vocab_size + 8)  # other ids: other key
  assert other.fingerprint != tok.fingerprint
  load_dataset(data, tokenizer=other)
  folders = sorted(p.name for p in ds.cache_path.iterdir() if p.is_dir() and p.name != "tfds")
  assert folders == sorted([f"hf-{tok.fingerprint[:16]}", f"hf-{other.fingerprint[:16]}",
                            "spm-bpe-300"])
  np.testing.assert_array_equal(np.asarray(load_dataset(data, tokenizer=tok).train.tokens),
                                rows)


@pytest.mark.slow
def test_bert_init_from_train_export_round_trip(hf_dirs, tmp_path):
  """The BERT path end to end: WordPiece vocab.txt, MLM fine-tuning, BertForMaskedLM."""
  _, corpus, _ = hf_dirs
  model_dir = tmp_path / "tiny-bert"
  wp = tokenizers.BertWordPieceTokenizer(lowercase=True)
  wp.train([corpus], vocab_size=200, show_progress=False,
           special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
  model_dir.mkdir()
  wp.save_model(str(model_dir))
  torch.manual_seed(0)
  cfg = transformers.BertConfig(vocab_size=wp.get_vocab_size(), hidden_size=32,
                                num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64)
  transformers.BertForMaskedLM(cfg).save_pretrained(model_dir)
  wd, out = tmp_path / "run", tmp_path / "export"
  proc = launcher("main.py", f"--workdir={wd}", f"--init_from={model_dir}", "--dmu_mode=dprob",
                  *run_flags(tmp_path, corpus))
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = launcher("export.py", f"--workdir={wd}", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  ids = HFTokenizer(model_dir, model_type="bert").encode("the cat sat on a mat.")
  assert transformers.AutoTokenizer.from_pretrained(out)(
      "The cat sat on a mat.", add_special_tokens=False)["input_ids"] == ids
  model = transformers.BertForMaskedLM.from_pretrained(out).eval()
  with torch.no_grad():
    got = model(torch.tensor([ids])).logits.numpy()
  _, _, want = stabjax_eval_logits(wd, ids)
  assert np.abs(got - want).max() < TOL

"""A pretrained model stays itself: its tokenizer (pre-tokenizer, chat template, end-of-turn
token) through import, checkpoints, export and serving; GGUF import; and elastify's recipe for
continued training (distillation from the original, FFN-only, the loss guard, a second corpus).

Every model is a tiny one made on the spot; the real SmolLM2-135M is for benchmarks and docs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import random_tokens, tiny_model, write_corpus
from tokenizers import pre_tokenizers

from matformer import checkpoint as ckpt
from matformer.cli import main
from matformer.config import ModelConfig
from matformer.data import DEFAULT_EVAL_CONTEXT, eval_context
from matformer.model import MatFormerLM
from matformer.recipe import TrainConfig
from matformer.runs import RunDir
from matformer.submodels.hf import import_hf
from matformer.submodels.pretokenizers import PreTokenizerError, hf_pretokenizer, llamacpp_pre
from matformer.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
            "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
            "{{ '<|im_start|>assistant\n' }}{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 42?"}]


def chat_tokenizer(tmp_path: Path, pre: str | None = None) -> Tokenizer:
    """A small trained BPE with ChatML tokens, a chat template and <|im_end|> as its end token
    (``pre``: replace the pre-tokenizer by llama.cpp's type of that name)."""
    corpus = write_corpus(tmp_path / "tok.txt", n_words=2000).read_text()
    base = Tokenizer.train_bpe([corpus + " 0123456789"], 300, show_progress=False).backend
    base.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    if pre is not None:
        base.pre_tokenizer = hf_pretokenizer(pre)
    return Tokenizer(base, chat_template=TEMPLATE, eos_token="<|im_end|>")


# ----------------------------------------------------------------------------- tokenizer
def test_chat_template_and_end_token_survive_a_checkpoint(tmp_path):
    tok = chat_tokenizer(tmp_path)
    end = tok.backend.token_to_id("<|im_end|>")
    assert tok.stop_ids == {tok.eos_id, end} and tok.eos_id != end
    model = tiny_model(vocab_size=320)
    ckpt.save_checkpoint(tmp_path / "c", model, tok)
    assert (tmp_path / "c" / ckpt.TOKENIZER_CONFIG).is_file()
    back = ckpt.load_tokenizer(tmp_path / "c")
    assert back == tok and back.chat_template == TEMPLATE and back.stop_ids == tok.stop_ids
    # a tokenizer without a template writes no config file, as before
    ckpt.save_checkpoint(tmp_path / "plain", model, Tokenizer.byte_level())
    assert not (tmp_path / "plain" / ckpt.TOKENIZER_CONFIG).exists()
    assert ckpt.load_tokenizer(tmp_path / "plain").chat_template is None


def test_chat_rendering_equals_transformers(tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok = chat_tokenizer(tmp_path)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok.backend, eos_token="<|im_end|>")
    fast.chat_template = TEMPLATE
    for gen in (True, False):
        want = fast.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
        assert tok.render_chat(MESSAGES, add_generation_prompt=gen) == want
    bad = Tokenizer(tok.backend, chat_template="{{ raise_exception('no system role') }}")
    with pytest.raises(ValueError, match="no system role"):
        bad.render_chat(MESSAGES)
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.byte_level().render_chat(MESSAGES)
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        Tokenizer(tok.backend, eos_token="<|nope|>")


def test_pretokenizer_types_map_both_ways(tmp_path):
    ours = json.loads(chat_tokenizer(tmp_path).to_json())
    assert llamacpp_pre(ours) == "gpt-2"  # our bounded GPT-2 split
    for pre in ("gpt-2", "smollm"):
        tok = chat_tokenizer(tmp_path, pre=pre)
        assert llamacpp_pre(json.loads(tok.to_json())) == pre
    smol = chat_tokenizer(tmp_path, pre="smollm")
    digits = [smol.decode([i]) for i in smol.encode("in 2024")]
    assert digits[-4:] == ["2", "0", "2", "4"]  # every digit a piece of its own
    other = chat_tokenizer(tmp_path).backend
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(PreTokenizerError, match="Whitespace"):
        llamacpp_pre(json.loads(other.to_str()))
    with pytest.raises(PreTokenizerError, match="'qwen2'"):
        hf_pretokenizer("qwen2")


# ----------------------------------------------------------------------------- GGUF import
@pytest.mark.parametrize("pre", ["gpt-2", "smollm"])
def test_gguf_written_by_us_imports_as_the_same_model(tmp_path, pre):
    pytest.importorskip("gguf")
    from matformer.submodels.gguf import export_gguf
    from matformer.submodels.hf import import_gguf

    tok = chat_tokenizer(tmp_path, pre=pre)
    model = tiny_model(vocab_size=tok.vocab_size, n_kv_head=1, ratios=(1.0,),
                       names=("XL",)).eval()
    info = export_gguf(model, tok, tmp_path / "m.gguf")
    assert info["tokenizer_pre"] == pre and info["chat_template"]
    back, btok = import_gguf(tmp_path / "m.gguf")
    x = random_tokens(2, 20, vocab=tok.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=1e-4, atol=1e-4)
    text = "the quick fox 12345 sat, on the mat!\n"
    assert btok.encode(text) == tok.encode(text)
    assert btok.chat_template == TEMPLATE and btok.eos_token == "<|im_end|>"
    assert btok.stop_ids == tok.stop_ids
    # the CLI takes the file where it takes a transformers folder
    assert main(["import-hf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "c")]) == 0
    assert ckpt.load_tokenizer(tmp_path / "c").chat_template == TEMPLATE


def test_gguf_import_refuses_what_it_cannot_read(tmp_path, capsys):
    pytest.importorskip("gguf")
    from matformer.submodels.gguf import export_gguf

    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    assert main(["import-hf", str(tmp_path / "junk.gguf"), "--out", str(tmp_path / "o")]) == 2
    assert "junk.gguf" in capsys.readouterr().err
    tok = chat_tokenizer(tmp_path)
    mixed = tiny_model(vocab_size=tok.vocab_size, d_ff=(64, 32), ratios=(1.0,), names=("XL",))
    export_gguf(mixed, tok, tmp_path / "deci.gguf")  # per-layer widths: llama.cpp's deci
    assert main(["import-hf", str(tmp_path / "deci.gguf"), "--out", str(tmp_path / "o")]) == 2
    assert "'deci'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_export_hf_keeps_the_chat_template(tmp_path):
    from transformers import AutoTokenizer

    from matformer.submodels.hf import export_hf, import_hf

    tok = chat_tokenizer(tmp_path)
    model = tiny_model(vocab_size=tok.vocab_size, ratios=(1.0,), names=("XL",))
    export_hf(model, tok, tmp_path / "hf")
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert theirs.eos_token == "<|im_end|>"
    assert theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) \
        == tok.render_chat(MESSAGES)
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert sorted(gen["eos_token_id"]) == sorted(tok.stop_ids)
    _, back = import_hf(tmp_path / "hf")
    assert back.chat_template == TEMPLATE and back.stop_ids == tok.stop_ids


# ----------------------------------------------------------------------------- eval context
def test_eval_context_rule():
    assert eval_context({}, 8192) == DEFAULT_EVAL_CONTEXT  # an import records none
    assert eval_context({}, 64) == 64
    assert eval_context({"seq_len": 256}, 8192) == 256
    assert eval_context({"seq_len": 256}, 8192, 100) == 100
    with pytest.raises(ValueError, match=r"1\.\.64"):
        eval_context({}, 64, 65)


def test_eval_takes_seq_len(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.txt")
    model = tiny_model(vocab_size=257)
    ckpt.save_checkpoint(tmp_path / "m", model, Tokenizer.byte_level(),
                         metadata={"data": str(corpus)})
    assert main(["eval", str(tmp_path / "m"), "--seq-len", "16", "--batches", "2",
                 "--batch-size", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["seq_len"] == 16 and out["val_tokens"] == 2 * 4 * 16
    assert main(["eval", str(tmp_path / "m"), "--seq-len", "33"]) == 2
    assert "1..32" in capsys.readouterr().err


# ----------------------------------------------------------------------------- elastify recipe
def test_train_config_checks_the_new_fields():
    with pytest.raises(ValueError, match="needs distill > 0"):
        TrainConfig(teacher="original")
    with pytest.raises(ValueError, match="teacher"):
        TrainConfig(teacher="nobody", distill=0.5)
    with pytest.raises(ValueError, match="train_only"):
        TrainConfig(train_only="attention")
    with pytest.raises(ValueError, match="max_val_loss"):
        TrainConfig(max_val_loss=float("nan"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(transformers folder of a dense model we pretrain briefly, its corpus, another corpus)."""
    base = tmp_path_factory.mktemp("pretrained")
    corpus = write_corpus(base / "corpus.txt", n_words=4000)
    other = write_corpus(base / "other.txt", n_words=2000, seed=7)
    assert main(["--threads", "1", "train", "--preset", "tiny", "--tokenizer", "byte",
                 "--batch-size", "8", "--precision", "fp32", "--no-progress",
                 "--warmup-steps", "5", "--mode", "baseline", "--granularity", "XL",
                 "--steps", "60", "--lr", "1e-2", "--eval-interval", "60", "--data", str(corpus),
                 "--out", str(base / "dense")]) == 0
    assert main(["export-hf", str(base / "dense"), "--out", str(base / "hf")]) == 0
    return base / "hf", corpus, other


ELASTIFY = ["--steps", "6", "--batch-size", "4", "--seq-len", "32", "--precision", "fp32",
            "--eval-batches", "2", "--eval-interval", "3", "--ckpt-interval", "3",
            "--no-progress", "--json"]


def _elastify(pretrained, out: Path, capsys, *extra: str) -> dict:
    folder, corpus, other = pretrained
    capsys.readouterr()
    assert main(["--threads", "1", "elastify", str(folder), "--out", str(out), "--data",
                 str(corpus), "--eval-data", str(other), *ELASTIFY, *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_ffn_only_leaves_everything_else_as_imported(pretrained, tmp_path, capsys):
    rep = _elastify(pretrained, tmp_path / "e", capsys, "--train-only", "ffn", "--lr", "1e-2")
    after = ckpt.load_model(ckpt.resolve(tmp_path / "e"), ModelConfig, MatFormerLM)
    dense, _ = import_hf(pretrained[0])
    changed = {k for k, v in after.state_dict().items()
               if not torch.equal(v, dense.state_dict()[k])}
    assert changed and all(".ffn." in k for k in changed), changed
    other = rep["eval_data"]
    assert set(other) >= {"data", "val_tokens", "reordered", "elastified"}
    assert other["data"] == str(pretrained[2].resolve())
    assert rep["train_config"]["train_only"] == "ffn" and rep["train_config"]["seq_len"] == 32


def test_distillation_from_the_original(pretrained, tmp_path, capsys):
    """The frozen original is saved beside the run, teaches every granularity (the full one
    too), and a resumed run finds it again."""
    out = tmp_path / "d"
    rep = _elastify(pretrained, out, capsys, "--distill", "0.7")
    assert rep["train_config"]["teacher"] == "original"
    teacher = ckpt.load_model(out / "teacher", ModelConfig, MatFormerLM)
    x = random_tokens(2, 16, vocab=teacher.config.vocab_size)
    dense, _ = import_hf(pretrained[0])
    with torch.no_grad():  # the teacher is the original (reordered: the same function)
        torch.testing.assert_close(teacher(x), dense(x), rtol=0, atol=1e-4)
    # a run killed after step 3 resumes with the same teacher
    import shutil

    shutil.rmtree(out / ckpt.CHECKPOINTS / "step_000006")
    (out / ckpt.LATEST).write_text("checkpoints/step_000003\n")
    assert main(["--threads", "1", "train", "--out", str(out), "--resume",
                 "--no-progress"]) == 0
    assert ckpt.resolve(out).name == "step_000006"
    shutil.rmtree(out / "teacher")
    (out / ckpt.LATEST).write_text("checkpoints/step_000003\n")
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 2
    assert "teacher" in capsys.readouterr().err


def test_the_original_teaches_the_full_model(pretrained, tmp_path):
    """At W = 1 the full model's loss is KL(original || full): zero at the start, and so is
    its gradient; self-distillation would have trained the full model on CE instead."""
    from matformer.data import prepare_data
    from matformer.elastify import make_elastic, materialize_copy
    from matformer.task import LMTask
    from matformer.train import Trainer

    dense, tok = import_hf(pretrained[0])
    task = LMTask(prepare_data(str(pretrained[1]), tok), tok, 32)
    norms = {}
    for teacher in ("original", "self"):
        model = make_elastic(dense)
        cfg = TrainConfig(mode="joint", loss_weights=(0, 0, 0, 1), distill=1.0, teacher=teacher,
                          steps=1, batch_size=4, precision="fp32", grad_clip=1e9)
        frozen = materialize_copy(model) if teacher == "original" else None
        trainer = Trainer(model, task, cfg, tmp_path / teacher, teacher=frozen, progress=False)
        rec = trainer.train_step()
        assert rec["loss"]["XL"] > 1  # the logged loss is the CE
        norms[teacher] = rec["grad_norm"]
    assert norms["original"] < 1e-4 < 0.1 < norms["self"], norms
    with pytest.raises(ValueError, match="teacher model is needed"):
        Trainer(make_elastic(dense), task, cfg.__class__(distill=1.0, teacher="original"),
                tmp_path / "run2", progress=False)


def test_guard_stops_and_keeps_the_last_good_checkpoint(pretrained, tmp_path, capsys):
    folder, corpus, _ = pretrained
    out = tmp_path / "g"
    code = main(["--threads", "1", "elastify", str(folder), "--out", str(out), "--data",
                 str(corpus), *ELASTIFY, "--lr", "0.5", "--warmup-steps", "0",
                 "--max-loss-increase", "0.05"])
    err = capsys.readouterr().err
    assert code == 2 and "rose to" in err and "max_val_loss" in err, err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    limit = json.loads((out / "train_config.json").read_text())["max_val_loss"]
    assert limit is not None
    bad = [r["step"] for r in records if "val_loss" in r and r["val_loss"]["XL"] > limit]
    assert bad, records
    kept = list(RunDir(out).steps())
    assert all(s < bad[0] for s in kept)  # nothing at or after the step that failed is saved


# ----------------------------------------------------------------------------- serving
def test_serve_chat_uses_the_models_template_and_end_token(tmp_path):
    """A model that brought a chat template is prompted with it and stops at its own end
    token. The model is rigged so greedy decoding always picks id 0, which this tokenizer
    names as its end token: the answer ends at once ("stop"); the same weights with the plain
    template decode id 0 until max_tokens."""
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    from test_serve import Running

    model = tiny_model(vocab_size=257, max_seq_len=256).eval()
    with torch.no_grad():
        model.norm.weight.zero_()  # every logit 0: argmax is id 0
    byte0 = Tokenizer.byte_level().decode([0])
    backend = Tokenizer.byte_level().backend
    end = backend.id_to_token(0)
    chat = Tokenizer(backend, chat_template=TEMPLATE, eos_token=end)
    assert chat.stop_ids == {0, chat.eos_id} and byte0 == "\x00"
    answers = {}
    for name, tok in (("template", chat), ("plain", Tokenizer.byte_level())):
        ckpt.save_checkpoint(tmp_path / name, model, tok)
        running = Running(tmp_path / name, measure_latency=False)
        try:
            client = openai.OpenAI(base_url=running.url + "/v1", api_key="x", max_retries=0)
            answers[name] = client.chat.completions.create(
                model="tiny-XL", messages=MESSAGES, max_tokens=5, temperature=0)
        finally:
            running.stop()
    templ = answers["template"]
    assert templ.choices[0].finish_reason == "stop" and templ.choices[0].message.content == ""
    assert templ.usage.prompt_tokens == len(chat.encode(chat.render_chat(MESSAGES)))
    plain = answers["plain"]
    assert plain.choices[0].finish_reason == "length" and plain.usage.completion_tokens == 5
    assert plain.usage.prompt_tokens == len("System: Be brief.\nUser: Hi 42?\nAssistant:")


def test_generate_chat_renders_the_template(tmp_path, capsys):
    tok = chat_tokenizer(tmp_path)
    model = tiny_model(vocab_size=tok.vocab_size, max_seq_len=128)
    ckpt.save_checkpoint(tmp_path / "m", model, tok)
    assert main(["generate", str(tmp_path / "m"), "--chat", "--prompt", "Hi 42?",
                 "--max-new-tokens", "4", "--temperature", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    prompt = tok.encode(tok.render_chat([{"role": "user", "content": "Hi 42?"}]))
    ref = generate_ids(model, prompt, 4)
    assert out["text"] == tok.decode(ref, skip_special_tokens=True)
    ckpt.save_checkpoint(tmp_path / "plain", model, Tokenizer.byte_level())
    assert main(["generate", str(tmp_path / "plain"), "--chat", "--prompt", "x"]) == 2
    assert "no chat template" in capsys.readouterr().err


def generate_ids(model, prompt: list[int], n: int) -> list[int]:
    from matformer.generate import generate

    return generate(model.eval(), [prompt], n, temperature=0)[0, len(prompt):].tolist()


def test_llama_cpp_tokenises_an_imported_tokenizer_as_we_do(tmp_path, capsys):
    """A SmolLM-style tokenizer (digits cut one by one) exported with the smollm type: llama.cpp
    gives the same ids on text with digits, and carries the chat template and end token."""
    pytest.importorskip("llama_cpp")
    from matformer.cli.gguf import CHECK_TEXT
    from matformer.submodels.gguf import load_llama

    tok = chat_tokenizer(tmp_path, pre="smollm")
    model = tiny_model(vocab_size=tok.vocab_size, max_seq_len=128)
    ckpt.save_checkpoint(tmp_path / "m", model, tok)
    assert main(["export-gguf", str(tmp_path / "m"), "--out", str(tmp_path / "m.gguf"),
                 "--check", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tokenizer_pre"] == "smollm" and info["check_same_tokens"]
    assert info["check_max_abs_logit_diff"] < 1e-4 and "note" not in info
    llm = load_llama(tmp_path / "m.gguf")
    try:
        for text in (CHECK_TEXT, "room 101 in 1984", "a1b22c333"):
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text)
        assert llm.token_eos() == tok.backend.token_to_id("<|im_end|>")
        assert llm.metadata["tokenizer.chat_template"] == TEMPLATE
    finally:
        llm.close()
    # a pre-tokenizer llama.cpp has no type for is refused by name, and nothing is written
    odd = chat_tokenizer(tmp_path).backend
    odd.pre_tokenizer = pre_tokenizers.Whitespace()
    ckpt.save_checkpoint(tmp_path / "odd", model, Tokenizer(odd))
    assert main(["export-gguf", str(tmp_path / "odd"), "--out", str(tmp_path / "o.gguf")]) == 2
    assert "Whitespace" in capsys.readouterr().err and not (tmp_path / "o.gguf").exists()


def test_elastify_never_writes_over_user_files_or_beside_its_input(pretrained, tmp_path,
                                                                  capsys):
    folder, corpus, _ = pretrained
    mine = tmp_path / "mine"
    mine.mkdir()
    files = {"notes.txt": "my notes", "metrics.jsonl": "{}\n", "train_config.json": "{}",
             "tokenizer.json": "x"}
    for name, text in files.items():
        (mine / name).write_text(text)
    base = ["--threads", "1", "elastify", str(folder), "--data", str(corpus), *ELASTIFY]
    assert main([*base, "--out", str(mine)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert {p.name: p.read_text() for p in mine.iterdir()} == files
    parent = folder.parent  # the folder holding the input model
    before = sorted(p.name for p in parent.iterdir())
    assert main([*base, "--out", str(parent)]) == 2
    assert "holds it" in capsys.readouterr().err
    assert sorted(p.name for p in parent.iterdir()) == before
    (tmp_path / "empty").mkdir()  # an empty folder holds nothing to lose
    assert main([*base, "--out", str(tmp_path / "empty")]) == 0

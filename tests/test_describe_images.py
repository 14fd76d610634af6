"""Captions, tags and the three steps in one run (`python -m rwkv_clip.describe caption|tags|all`), against the
loopback vision server of rwkv_clip.describe.testing and a tiny local transformers model built here."""

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from rwkv_clip.describe import PromptTemplate, clean_answer
from rwkv_clip.describe.__main__ import main
from rwkv_clip.describe.pipeline import caption, describe_all, tags
from rwkv_clip.describe.prompt import parse_tag_answer
from rwkv_clip.describe.testing import MockChatServer, mock_answer, sigkill_when_written
from rwkv_clip.schema import format_tags
from test_describe import FAST, read_out, write_csv, write_jsonl

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (35, 70, 225), "yellow": (240, 215, 20)}
CAPTION_PROMPT = PromptTemplate.from_file(None, 30, default="caption_prompt.txt", image=True).render()
TAGS_PROMPT = PromptTemplate.from_file(None, 5, default="tags_prompt.txt", image=True).render()
REWRITE = PromptTemplate.from_file(None, 40)


def png(path: Path, colour: str, marker: str = "", size=(48, 40)) -> Path:
    """A plain image of one colour; ``marker`` goes into a PNG text chunk, where the mock server finds it."""
    info = PngImagePlugin.PngInfo()
    if marker:
        info.add_text("comment", marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, COLOURS[colour]).save(path, pnginfo=info)
    return path


def make_pairs(folder: Path, n: int, markers: dict = None) -> list:
    """Rows with a PNG each (colours in turn: red, green, blue, yellow) under folder/img, paths relative."""
    markers = markers or {}
    for i in range(n):
        png(folder / "img" / f"{i}.png", list(COLOURS)[i % 4], markers.get(i, ""))
    return [{"key": f"k{i:03d}", "image": f"img/{i}.png", "text": f"alt text {i}"} for i in range(n)]


@pytest.fixture
def server():
    with MockChatServer(hang_seconds=1.0) as s:
        yield s


def expected_caption(image: Path) -> str:
    return clean_answer(mock_answer(CAPTION_PROMPT, [image.read_bytes()]), 37)


# ------------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("raw, want", [
    ("dog, red ball, grass", ["dog", "red ball", "grass"]),
    ("Here are the objects:\n- A dog\n- the red ball\n- Grass.", ["dog", "red ball", "grass"]),
    ("Tags: 1. cat 2) sofa", ["cat 2) sofa"]),
    ("1. cat\n2. sofa\n3. cat\n4. lamp\n5. rug\n6. window", ["cat", "sofa", "lamp", "rug", "window"]),
    ("The image shows a small dog playing with a ball on the grass", []),  # a sentence, not a list
    ("I'm sorry, I can't help with that.", []),
    ("<think>a dog?</think>dog | ball", ["dog", "ball"]),
])
def test_parse_tag_answer(raw, want):
    assert parse_tag_answer(raw, 5) == want


# ------------------------------------------------------------------------------------------------ HTTP path
def test_caption_sends_each_image_inline(server, tmp_path):
    rows = make_pairs(tmp_path, 8)
    inp = write_csv(tmp_path / "in.csv", rows)
    s = caption(str(inp), str(tmp_path / "o.jsonl"), base_url=server.url, concurrency=4, **FAST)
    assert s.ok and s.generated == 8 and server.images == 8
    got = {r["key"]: r for r in read_out(tmp_path / "o.jsonl")}
    for i, r in enumerate(rows):
        out = got[r["key"]]
        assert out["synthetic_caption"] == expected_caption(tmp_path / r["image"])
        assert out["synthetic_caption"].startswith(list(COLOURS)[i % 4])  # the server decoded this row's image
        assert out["text"] == r["text"] and out["image"] == r["image"] and out["status"] == "generated"


def test_unreadable_images_are_marked_never_dropped(server, tmp_path):
    rows = make_pairs(tmp_path, 6)
    (tmp_path / "img" / "1.png").unlink()                                   # missing file
    (tmp_path / "img" / "2.png").write_bytes(b"not an image at all")         # not an image
    data = (tmp_path / "img" / "3.png").read_bytes()
    (tmp_path / "img" / "3.png").write_bytes(data[: len(data) // 2])        # truncated
    rows[4]["image"] = ""                                                   # no image
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    rc = main(["caption", "--input", str(inp), "--output", str(tmp_path / "o.csv"), "--base_url", server.url,
               "--progress", "false"])
    assert rc == 1  # failed rows make the exit status nonzero
    got = {r["key"]: r for r in read_out(tmp_path / "o.csv")}
    assert sorted(got) == [r["key"] for r in rows]
    assert [got[f"k00{i}"]["status"] for i in range(6)] == ["generated", "failed", "failed", "failed", "failed",
                                                            "generated"]
    reasons = {i: got[f"k00{i}"]["reason"] for i in range(1, 5)}
    assert "1.png" in reasons[1] and "No such file" in reasons[1]
    assert "2.png" in reasons[2] and "not an image" in reasons[2]
    assert "3.png" in reasons[3] and "not a readable image" in reasons[3]
    assert "no image" in reasons[4]
    assert server.images == 2  # no request for a row whose image cannot be read
    state = json.loads((tmp_path / "o.csv.describe.json").read_text())
    assert state["counts"] == {"generated": 2, "fallback": 0, "failed": 4} and state["status"] == "complete"


def test_caption_survives_5xx_and_hangs(server, tmp_path):
    rows = make_pairs(tmp_path, 6, {1: "[[500x2]]", 2: "[[503x1]]", 3: "[[hangx1]]", 4: "[[429x1]]"})
    inp = write_csv(tmp_path / "in.csv", rows)
    s = caption(str(inp), str(tmp_path / "o.jsonl"), base_url=server.url, concurrency=3, **FAST)
    assert s.ok and s.generated == 6
    assert s.retries == {"5xx": 3, "timeout": 1, "429": 1}
    got = {r["key"]: r["synthetic_caption"] for r in read_out(tmp_path / "o.jsonl")}
    assert all(got[r["key"]] == expected_caption(tmp_path / r["image"]) for r in rows)


def test_tags_from_the_vision_server(server, tmp_path):
    rows = make_pairs(tmp_path, 4)
    inp = write_csv(tmp_path / "in.csv", rows)
    s = tags(str(inp), str(tmp_path / "o.jsonl"), tagger="openai", base_url=server.url, top_k=2, **FAST)
    assert s.ok and s.generated == 4
    for r in read_out(tmp_path / "o.jsonl"):
        answer = mock_answer(PromptTemplate.from_file(None, 2, default="tags_prompt.txt", image=True).render(),
                             [(tmp_path / r["image"]).read_bytes()])
        assert r["tags"] == ", ".join(parse_tag_answer(answer, 2))
        assert r["tags"].split(", ")[0] == list(COLOURS)[int(r["row"]) % 4] + " object"


def test_all_steps_give_prepare_three_texts(server, tmp_path):
    rows = make_pairs(tmp_path, 6)
    rows[5]["image"] = "img/missing.png"
    inp = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out" / "described.parquet"
    s = describe_all(str(inp), str(out), base_url=server.url, tagger="openai", **FAST)
    assert s.complete and not s.ok  # one image is missing: failed in two steps, described from its text
    assert {k: (v.generated, v.failed) for k, v in s.steps.items()} == \
        {"caption": (5, 1), "tags": (5, 1), "describe": (6, 0)}
    import pyarrow.parquet as pq

    got = {r["key"]: r for r in pq.read_table(out).to_pylist()}
    assert sorted(got) == [r["key"] for r in rows]
    for r in rows[:5]:
        o = got[r["key"]]
        assert o["synthetic_caption"] == expected_caption(tmp_path / r["image"])
        assert o["caption_status"] == o["tags_status"] == o["status"] == "generated"
        # the description was asked from this row's caption and tags
        prompt = REWRITE.render(r["text"], o["synthetic_caption"], format_tags(o["tags"]))
        assert o["generated_caption"] == clean_answer(mock_answer(prompt), 50)
        assert (out.parent / o["image"]).resolve() == (tmp_path / r["image"]).resolve()
    lost = got["k005"]
    assert lost["caption_status"] == lost["tags_status"] == "failed" and "missing.png" in lost["caption_reason"]
    assert lost["status"] == "generated" and lost["synthetic_caption"] == "" and lost["tags"] == ""

    # prepare reads the result with all three texts
    from rwkv_clip.datamodules.prepare import prepare

    prepared = tmp_path / "prepared"
    prepare(str(out), str(prepared), num_workers=0, progress=False)
    from litdata import StreamingDataset

    samples = list(StreamingDataset(str(prepared / "train")))
    assert len(samples) == 5  # prepare skips the row whose image is missing
    assert all(x["text"] and x["synthetic_caption"] and x["generated_caption"] for x in samples)


def test_all_resume_redoes_later_steps_of_a_row_whose_caption_changed(server, tmp_path):
    # Row 2's image makes the server fail its first request (for the caption, and for the tags): with no retries
    # both steps fail, and the description is made from the raw text alone.
    rows = make_pairs(tmp_path, 4, {2: "[[500x1]]"})
    inp = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "o.jsonl"
    opts = dict(base_url=server.url, tagger="openai", **{**FAST, "max_retries": 0})
    s = describe_all(str(inp), str(out), **opts)
    first = {r["key"]: r for r in read_out(out)}
    assert first["k002"]["caption_status"] == "failed" and s.steps["describe"].generated == 4
    s = describe_all(str(inp), str(out), resume=True, **opts)
    assert s.ok and s.steps["caption"].processed == 1 and s.steps["describe"].processed == 1
    got = read_out(out)
    assert sorted(r["row"] for r in got) == [0, 1, 2, 3]
    row = {r["key"]: r for r in got}["k002"]
    assert row["caption_status"] == row["tags_status"] == "generated"
    prompt = REWRITE.render(row["text"], row["synthetic_caption"], format_tags(row["tags"]))
    assert row["generated_caption"] == clean_answer(mock_answer(prompt), 50) != first["k002"]["generated_caption"]


@pytest.mark.parametrize("kill_in", ["caption", "describe"])
def test_all_killed_then_resumed_has_every_row_once(tmp_path, kill_in):
    n = 60
    rows = make_pairs(tmp_path, n)
    inp = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "o.csv"
    watch = out.with_name("o.csv.steps") / "caption.jsonl" if kill_in == "caption" else out
    with MockChatServer(delay=0.03) as s:
        cmd = [sys.executable, "-m", "rwkv_clip.describe", "all", "--input", str(inp), "--output", str(out),
               "--base_url", s.url, "--tagger", "openai", "--concurrency", "2", "--flush_every", "1",
               "--progress", "false"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
        sigkill_when_written(proc, watch, lines=10, timeout=60)
        done_before = watch.read_text().count("\n")
        assert 10 <= done_before < n + 1
        rc = main(["all", "--input", str(inp), "--output", str(out), "--base_url", s.url, "--tagger", "openai",
                   "--resume", "--progress", "false"])
    assert rc == 0
    got = read_out(out)
    assert sorted(int(r["row"]) for r in got) == list(range(n))  # every row exactly once
    assert all(r["status"] == r["caption_status"] == r["tags_status"] == "generated" for r in got)
    for step in ("caption", "tags"):
        step_rows = read_out(out.with_name("o.csv.steps") / f"{step}.jsonl")
        assert sorted(r["row"] for r in step_rows) == list(range(n))


# ------------------------------------------------------------------------------------------------ transformers
def _tiny_blip(folder: Path):
    """A BLIP captioner with random weights, built from a config with a tokenizer made here (no hub access)."""
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "picture", "of", "red", "green", "blue", "yellow",
             "circle", "square", "on", "the", "gray", "background", "small", "large"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    if "vocab" in inspect.signature(transformers.BertTokenizerFast.__init__).parameters:  # transformers >= 5
        tok = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    else:
        tok = transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    assert len(tok) == len(words)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    processor = transformers.BlipProcessor(image_processor=transformers.BlipImageProcessor(
        size={"height": 32, "width": 32}), tokenizer=tok)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=64, bos_token_id=tok.bos_token_id,
                pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    model = transformers.BlipForConditionalGeneration(transformers.BlipConfig(text_config=text,
                                                                               vision_config=vision))
    with torch.no_grad():  # random weights end at once or say only special tokens: make it say words
        model.text_decoder.cls.predictions.bias[tok.all_special_ids] = -1e4
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model.eval(), processor


def test_transformers_captioner_matches_the_model(tmp_path):
    import torch

    model, processor = _tiny_blip(tmp_path / "blip")
    rows = make_pairs(tmp_path, 5)
    rows[3]["image"] = "img/none.png"
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    s = caption(str(inp), str(tmp_path / "o.jsonl"), backend="transformers", model=str(tmp_path / "blip"),
                batch_size=2, max_tokens=6, min_words=1, device="cpu", progress=False)
    assert s.complete and s.generated == 4 and s.failed == 1
    got = {r["key"]: r for r in read_out(tmp_path / "o.jsonl")}
    assert got["k003"]["status"] == "failed" and "none.png" in got["k003"]["reason"]
    for r in rows[:3] + rows[4:]:  # each caption is what the model says about that image alone
        with Image.open(tmp_path / r["image"]) as im:
            enc = processor(images=[im.convert("RGB")], return_tensors="pt")
        with torch.inference_mode():
            ids = model.generate(**enc, max_new_tokens=6, do_sample=False, num_beams=1)
        want = processor.tokenizer.batch_decode(ids, skip_special_tokens=True)[0]
        assert len(want.split()) == 6 and got[r["key"]]["synthetic_caption"] == clean_answer(want, 37)

    # a text for the model to continue ("a picture of" for BLIP) is given to it and cut from its answer
    s = caption(str(inp), str(tmp_path / "p.jsonl"), backend="transformers", model=str(tmp_path / "blip"),
                local_prompt="a picture of", batch_size=3, max_tokens=4, min_words=1, device="cpu", progress=False)
    got = {r["key"]: r["synthetic_caption"] for r in read_out(tmp_path / "p.jsonl")}
    with Image.open(tmp_path / rows[0]["image"]) as im:
        enc = processor(images=[im.convert("RGB")], text=["a picture of"], return_tensors="pt")
    with torch.inference_mode():
        ids = model.generate(**enc, max_new_tokens=4, do_sample=False, num_beams=1)
    want = processor.tokenizer.batch_decode(ids, skip_special_tokens=True)[0]
    assert want.startswith("a picture of ") and got["k000"] == clean_answer(want[len("a picture of "):], 37)


def test_transformers_captioner_needs_a_model_directory(tmp_path):
    pytest.importorskip("transformers")
    inp = write_jsonl(tmp_path / "in.jsonl", make_pairs(tmp_path, 1))
    with pytest.raises(ValueError, match="local model directory"):
        caption(str(inp), str(tmp_path / "o.jsonl"), backend="transformers", model="Salesforce/blip-base",
                progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image-to-text model"):
        caption(str(inp), str(tmp_path / "o.jsonl"), backend="transformers", model=str(tmp_path / "empty"),
                progress=False)
    assert not (tmp_path / "o.jsonl").exists()


def test_transformers_captioner_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    (tmp_path / "model").mkdir()
    inp = write_jsonl(tmp_path / "in.jsonl", make_pairs(tmp_path, 1))
    with pytest.raises(ImportError, match=r"rwkv-clip\[describe\]"):
        caption(str(inp), str(tmp_path / "o.jsonl"), backend="transformers", model=str(tmp_path / "model"),
                progress=False)


def test_bench_describe_measures_every_backend(tmp_path, capsys, monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_describe

    monkeypatch.chdir(tmp_path)  # no demo data or checkpoint here: the CLIP tagger line says it is skipped
    results = bench_describe.main(["--delay", "0.01", "--rows1", "4", "--rows16", "16", "--images", "8",
                                   "--blip", "tiny", "--blip-images", "4", "--device", "cpu"])
    out = capsys.readouterr().out
    assert set(results) == {"caption openai", "tags openai", "caption transformers blip-tiny"}
    assert all(v > 0 for v in results.values())
    assert "captions/s" in out and "tags/s" in out and "CLIP tagger: skipped" in out


def test_bad_options_fail_before_any_output(server, tmp_path):
    inp = write_csv(tmp_path / "in.csv", [{"path": "img/0.png", "text": "a"}])
    out = tmp_path / "o.jsonl"
    with pytest.raises(ValueError, match="--image_key"):
        caption(str(inp), str(out), base_url=server.url, **FAST)
    inp = write_csv(tmp_path / "in2.csv", make_pairs(tmp_path, 2))
    with pytest.raises(ValueError, match="--vocabulary"):
        tags(str(inp), str(out), model=str(inp), **FAST)
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="holds no tags"):
        tags(str(inp), str(out), model=str(inp), vocabulary=str(tmp_path / "empty.txt"), **FAST)
    with pytest.raises(ValueError, match="is not a file"):
        tags(str(inp), str(out), model=str(tmp_path / "none.ckpt"), vocabulary=str(inp), **FAST)
    (tmp_path / "bad_prompt.txt").write_text("Describe {caption}")
    with pytest.raises(ValueError, match="unknown placeholder"):
        caption(str(inp), str(out), base_url=server.url, prompt_template=str(tmp_path / "bad_prompt.txt"), **FAST)
    assert not out.exists() and not Path(str(out) + ".describe.json").exists()

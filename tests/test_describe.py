"""Description generation against a real chat-completions server on 127.0.0.1 (rwkv_clip.describe.testing)."""

import csv
import hashlib
import json
import logging
import random
import sys
from collections import Counter
from pathlib import Path

import pytest

from rwkv_clip.describe import PromptTemplate, backoff_delay, check_answer, clean_answer, describe
from rwkv_clip.schema import format_tags
from rwkv_clip.describe.client import FatalBackendError
from rwkv_clip.describe.testing import MockChatServer, mock_answer

FAST = dict(timeout=0.5, max_retries=3, backoff_base=0.01, backoff_max=0.2, progress=False)
TEMPLATE = PromptTemplate.from_file(None, 40)


def expected_answer(row: dict) -> str:
    return mock_answer(TEMPLATE.render(row.get("text", ""), row.get("synthetic_caption", ""),
                                       format_tags(row.get("tags"))))


def make_rows(n: int, markers: dict = None) -> list:
    markers = markers or {}
    return [{"key": f"k{i:04d}", "image": f"images/{i}.jpg", "text": f"raw text {i} {markers.get(i, '')}".strip(),
             "synthetic_caption": f"a caption for image {i}", "tags": "dog | ball | grass"} for i in range(n)]


def write_csv(path: Path, rows: list) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_out(path: Path) -> list:
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def server():
    with MockChatServer(hang_seconds=1.0) as s:
        yield s


# ------------------------------------------------------------------------------------------------ text handling
@pytest.mark.parametrize("raw, want", [
    ('Description: "A dog runs on the beach."', "A dog runs on the beach."),
    ("Sure! Here is a description of the image:\n\nA dog runs on the beach.", "A dog runs on the beach."),
    ("**Caption:** A dog runs on the beach.", "A dog runs on the beach."),
    ("<think>the tags say dog</think>\n“A dog runs on the beach.”", "A dog runs on the beach."),
    ("A dog runs on the beach.\n\nNote: I ignored the tag 'car'.", "A dog runs on the beach."),
    ("A dog runs on the beach. (7 words)", "A dog runs on the beach."),
    ('"Dog" painted on a wall in red letters.', '"Dog" painted on a wall in red letters.'),
    ("   ", ""),
    (None, ""),
])
def test_clean_answer(raw, want):
    assert clean_answer(raw, 50) == want


def test_cap_words_prefers_sentence_end():
    s = "A dog runs on the beach. " + " ".join(["It is very happy"] * 10)
    assert clean_answer(s, 10) == "A dog runs on the beach."
    capped = clean_answer(" ".join(["word"] * 30) + " with a", 12)
    assert len(capped.split()) <= 12 and capped.endswith("word.")


def test_check_answer_rejects():
    t = TEMPLATE
    assert check_answer("", t) == "empty answer"
    assert check_answer("I'm sorry, but I can't help with that request.", t) == "refusal"
    assert check_answer("As an AI language model, I do not see images.", t) == "refusal"
    echoed = t.render("a dog", "a dog on grass", "dog, grass")
    assert check_answer(clean_answer(echoed, 200), t) == "repeats the prompt"
    assert check_answer("Raw web text: a dog. Synthetic caption: a dog on grass. Detected tags: dog", t) \
        == "repeats the prompt"
    assert check_answer("A dog.", t, min_words=3).startswith("too short")
    assert check_answer("A brown dog sleeps on green grass near a fence.", t) is None


def test_template_placeholders(tmp_path):
    with pytest.raises(ValueError, match=r"\{caption\}"):
        PromptTemplate("Describe {caption}")
    with pytest.raises(ValueError, match="none of"):
        PromptTemplate("Describe the image in {max_words} words")
    p = tmp_path / "p.txt"
    p.write_text('Merge {text} / {synthetic_caption} / {tags} in {max_words} words. JSON: {"a": 1}')
    t = PromptTemplate.from_file(str(p), 25)
    assert t.render("raw", "", "a, b") == 'Merge raw / (none) / a, b in 25 words. JSON: {"a": 1}'
    with pytest.raises(ValueError, match="not a file"):
        PromptTemplate.from_file(str(tmp_path / "missing.txt"))
    default = TEMPLATE.render("t", "c", "g")
    assert "at most 40 words" in default and "none of the three" in default


def test_format_tags():
    assert format_tags("dog | ball|Dog ; grass") == "dog, ball, grass"
    assert format_tags(["cat", " sofa "]) == "cat, sofa"
    assert format_tags(None) == ""


def test_backoff_grows_with_jitter():
    rng = random.Random(0)
    for attempt in range(6):
        ds = [backoff_delay(attempt, 1.0, 60.0, rng) for _ in range(200)]
        lo, hi = 0.5 * min(60, 2 ** attempt), min(60, 2 ** attempt)
        assert all(lo <= d <= hi for d in ds) and len(set(ds)) > 100  # jittered, within the band
    assert backoff_delay(0, 1.0, 60.0, rng, retry_after=7) == 7
    assert backoff_delay(0, 1.0, 5.0, rng, retry_after=100) == 5


# ------------------------------------------------------------------------------------------------ end to end
MARKERS = {1: "[[500x2]]", 2: "[[429x2]]", 3: "[[hangx1]]", 4: "[[badjsonx1]]", 5: "[[refuse]]", 6: "[[empty]]",
           7: "[[echo]]", 8: "[[prefix]]", 9: "[[500]]", 10: "[[400]]", 11: "[[dropx2]]", 12: "[[nochoicesx1]]",
           13: "[[503x1]]"}


def test_every_row_accounted_for(server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="rwkv_clip.describe")
    rows = make_rows(40, MARKERS)
    inp = write_csv(tmp_path / "in.csv", rows)
    before = sha(inp)
    out = tmp_path / "out" / "described.csv"
    s = describe(str(inp), str(out), base_url=server.url, concurrency=8, **FAST)
    got = read_out(out)
    assert sha(inp) == before  # input untouched
    assert sorted(int(r["row"]) for r in got) == list(range(40))  # every row exactly once
    by_row = {int(r["row"]): r for r in got}
    status = {i: by_row[i]["status"] for i in by_row}
    assert s.complete and s.total == 40 and (s.generated, s.fallback, s.failed) == (
        Counter(status.values())["generated"], Counter(status.values())["fallback"], 2)
    for i in (0, 1, 2, 3, 4, 8, 11, 12, 13, 20, 39):  # answered (possibly after retries): the row's own answer
        assert status[i] == "generated", (i, by_row[i])
        assert by_row[i]["generated_caption"] == expected_answer(rows[i])
    for i, reason in ((5, "refusal"), (6, "empty answer"), (7, "repeats the prompt")):
        assert status[i] == "fallback" and by_row[i]["reason"] == reason
        assert by_row[i]["generated_caption"] == rows[i]["synthetic_caption"]
    assert status[9] == "failed" and "HTTP 500" in by_row[9]["reason"] and "after 4 attempts" in by_row[9]["reason"]
    assert status[10] == "failed" and "HTTP 400" in by_row[10]["reason"]
    assert by_row[9]["generated_caption"] == ""
    # retries really happened, and only for the rows that needed them
    assert len(server.requests_for("[[500x2]]")) == 3 and len(server.requests_for("[[429x2]]")) == 3
    assert len(server.requests_for("[[500]]")) == 4 and len(server.requests_for("[[400]]")) == 1
    assert len(server.requests_for("raw text 20")) == 1
    assert s.retries["429"] == 2 and s.retries["timeout"] == 1 and s.retries["bad response"] == 2
    # failed rows listed with reasons, in the summary file too
    assert sorted(r for r, _, _ in s.failed_rows) == [9, 10]
    state = json.loads((tmp_path / "out" / "described.csv.describe.json").read_text())
    assert state["status"] == "complete" and state["counts"]["failed"] == 2
    assert {r for r, _, _ in state["failed_rows"]} == {9, 10}
    # image paths still resolve from the output's folder (here: absolute, the images are outside it)
    assert Path(by_row[0]["image"]) == (tmp_path / "images" / "0.jpg")
    assert by_row[0]["key"] == "k0000" and by_row[0]["tags"] == "dog | ball | grass"


def test_backoff_between_attempts(server, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", make_rows(1, {0: "[[500x3]]"}))
    describe(str(inp), str(tmp_path / "o.jsonl"), base_url=server.url, concurrency=1, timeout=2, max_retries=4,
             backoff_base=0.05, backoff_max=5, progress=False)
    t = [e[0] for e in server.requests_for("[[500x3]]")]
    assert len(t) == 4
    gaps = [b - a for a, b in zip(t, t[1:])]
    # delays are drawn from [0.025, 0.05], [0.05, 0.1], [0.1, 0.2]: each band starts where the last ended
    assert gaps[0] >= 0.025 and gaps[1] >= 0.05 and gaps[2] >= 0.1, gaps
    assert gaps[2] > gaps[0], gaps


def test_refuses_to_overwrite(server, tmp_path):
    inp = write_csv(tmp_path / "in.csv", make_rows(3))
    with pytest.raises(ValueError, match="is the input"):
        describe(str(inp), str(inp), base_url=server.url, **FAST)
    out = tmp_path / "o.csv"
    out.write_text("precious\n")
    with pytest.raises(FileExistsError, match="--resume true"):
        describe(str(inp), str(out), base_url=server.url, **FAST)
    assert out.read_text() == "precious\n"
    assert not server.log  # refused before sending anything


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_resume_after_stop_no_duplicates(server, tmp_path, suffix):
    rows = make_rows(30, {4: "[[500]]"})
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / ("o" + suffix)
    s1 = describe(str(inp), str(out), base_url=server.url, concurrency=4, max_rows=12, **FAST)
    assert s1.stopped and not s1.complete and s1.processed == 12
    first = read_out(out)
    assert len(first) == 12
    done_first = {int(r["row"]) for r in first if r["status"] != "failed"}
    # simulate a kill in the middle of a write: a cut record at the end of the file
    with open(out, "a", encoding="utf-8") as f:
        f.write('{"row": 29, "status": "gener' if suffix == ".jsonl" else '29,images/29.jpg,"raw text 29\n')
    asked_before = Counter(e[1] for e in server.log)
    s2 = describe(str(inp), str(out), base_url=server.url, concurrency=4, resume=True, **FAST)
    got = read_out(out)
    assert sorted(int(r["row"]) for r in got) == list(range(30))  # complete, no duplicates
    assert s2.complete and s2.done_before == len(done_first) and s2.failed == 1
    asked_after = Counter(e[1] for e in server.log) - asked_before
    for i in done_first:  # finished rows were not asked again
        assert not any(f"Raw web text: raw text {i}\n" in c for c in asked_after), i
    assert any("Raw web text: raw text 29\n" in c for c in asked_after)  # the cut record was redone
    for r in got:
        if r["status"] == "generated":
            assert r["generated_caption"] == expected_answer(rows[int(r["row"])])


def test_resume_retries_failed_rows(server, tmp_path):
    inp = write_csv(tmp_path / "in.csv", make_rows(10))
    out = tmp_path / "o.jsonl"
    server.force = "503"  # the server is down for the first run
    s1 = describe(str(inp), str(out), base_url=server.url, concurrency=4, max_consecutive_failures=0, **FAST)
    assert s1.failed == 10 and s1.complete
    server.force = None
    s2 = describe(str(inp), str(out), base_url=server.url, concurrency=4, resume=True, **FAST)
    got = read_out(out)
    assert s2.generated == 10 and s2.failed == 0
    assert sorted(int(r["row"]) for r in got) == list(range(10)) and {r["status"] for r in got} == {"generated"}
    s3 = describe(str(inp), str(out), base_url=server.url, resume=True, **FAST)  # nothing left: a no-op
    assert s3.processed == 0 and s3.done_before == 10 and len(read_out(out)) == 10


def test_server_down_stops_run_resumably(server, tmp_path):
    inp = write_csv(tmp_path / "in.csv", make_rows(60))
    out = tmp_path / "o.csv"
    server.force = "500"
    with pytest.raises(RuntimeError, match="rows failed in a row"):
        describe(str(inp), str(out), base_url=server.url, concurrency=2, max_consecutive_failures=5, **FAST)
    assert len(read_out(out)) < 60
    state = json.loads((tmp_path / "o.csv.describe.json").read_text())
    assert state["status"] == "incomplete"
    server.force = None
    s = describe(str(inp), str(out), base_url=server.url, concurrency=8, resume=True, **FAST)
    assert s.complete and s.generated == 60 and sorted(int(r["row"]) for r in read_out(out)) == list(range(60))


def test_api_key_never_leaks(tmp_path, monkeypatch, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    secret = "sk-test-7f3a9c1d2e"
    monkeypatch.setenv("DESCRIBE_TEST_KEY", secret)
    rows = make_rows(6, {1: "[[400]]", 2: "[[500]]", 3: "[[dropx1]]"})
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    with MockChatServer(api_key=secret) as s:
        summ = describe(str(inp), str(tmp_path / "o.jsonl"), base_url=s.url, api_key_env="DESCRIBE_TEST_KEY",
                        concurrency=2, **FAST)
        assert s.auth_headers == {f"Bearer {secret}"}  # it was sent ...
        assert summ.generated == 4 and summ.failed == 2
        monkeypatch.setenv("DESCRIBE_TEST_KEY", secret[:-1] + "X")  # a wrong key: the run stops at once
        with pytest.raises(FatalBackendError, match="DESCRIBE_TEST_KEY") as e:
            describe(str(inp), str(tmp_path / "o2.jsonl"), base_url=s.url, api_key_env="DESCRIBE_TEST_KEY",
                     model="mock-model", **FAST)
    out = capsys.readouterr()
    files = "".join(p.read_text(errors="replace") for p in tmp_path.iterdir() if p.is_file())
    for where in (out.out, out.err, caplog.text, files, str(e.value), json.dumps(summ.failed_rows)):
        assert secret not in where and secret[:-1] + "X" not in where  # ... but never shown
    assert "Bearer ***" in files  # the server echoed it in an error; we redacted it


def test_jsonl_remapped_keys_list_tags(server, tmp_path):
    rows = [{"id": i, "alt": f"alt {i}", "ofa": f"ofa caption {i}", "ram": ["cat", "sofa"], "url": f"pics/{i}.png",
             "extra": {"w": 3}} for i in range(5)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "o.jsonl"
    s = describe(str(inp), str(out), base_url=server.url, text_key="alt", synthetic_caption_key="ofa",
                 tags_key="ram", image_key="url", id_key="id", **FAST)
    got = {r["row"]: r for r in read_out(out)}
    assert s.generated == 5
    r0 = got[0]
    assert r0["text"] == "alt 0" and r0["synthetic_caption"] == "ofa caption 0" and r0["tags"] == "cat, sofa"
    assert r0["key"] == 0 and r0["extra"] == {"w": 3} and r0["image"] == "pics/0.png"  # relative to the output
    assert (out.parent / r0["image"]) == (tmp_path / "pics" / "0.png")
    assert r0["generated_caption"] == mock_answer(TEMPLATE.render("alt 0", "ofa caption 0", "cat, sofa"))


def test_missing_columns_error(server, tmp_path):
    inp = write_csv(tmp_path / "in.csv", [{"caption": "x", "url": "y"}])
    with pytest.raises(ValueError, match="--text_key"):
        describe(str(inp), str(tmp_path / "o.csv"), base_url=server.url, **FAST)


def test_unreadable_and_empty_rows(server, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"text": "a red bus"}\n{"text": "oops\n{"text": "", "synthetic_caption": "", "tags": ""}\n')
    s = describe(str(inp), str(tmp_path / "o.jsonl"), base_url=server.url, **FAST)
    assert (s.total, s.generated, s.fallback, s.failed) == (3, 1, 1, 1) and s.complete
    assert s.failed_rows[0][0] == 1 and "unreadable JSON" in s.failed_rows[0][2]


def test_model_detection_and_wrong_model(server, tmp_path):
    inp = write_csv(tmp_path / "in.csv", make_rows(2))
    s = describe(str(inp), str(tmp_path / "a.csv"), base_url=server.url, **FAST)  # model from /v1/models
    assert s.generated == 2
    with pytest.raises(FatalBackendError, match="--model"):
        describe(str(inp), str(tmp_path / "b.csv"), base_url=server.url, model="nope", **FAST)


def test_instruction_data(server, tmp_path):
    rows = make_rows(30, {i: "[[refuse]]" for i in range(0, 30, 7)})
    inp = write_csv(tmp_path / "in.csv", rows)
    sft = tmp_path / "sft" / "describe_sft.json"
    s = describe(str(inp), None, base_url=server.url, sample=12, seed=3, instruction_data=str(sft), **FAST)
    assert s.total == 12 and s.complete
    pairs = json.loads(sft.read_text())
    assert len(pairs) == s.generated == s.instruction_pairs
    sampled = {int(r["row"]) for r in read_out(Path(str(sft.with_suffix("")) + ".rows.jsonl"))}
    assert sampled == set(random.Random(3).sample(range(30), 12))
    for p in pairs:
        assert set(p) == {"instruction", "input", "output", "system"}
        assert p["output"] == mock_answer(p["instruction"])  # the pair is the model's own (prompt, answer)
        assert "Raw web text: raw text" in p["instruction"]
    info = json.loads((sft.parent / "dataset_info.json").read_text())
    assert info["describe_sft"]["file_name"] == "describe_sft.json"
    # sharegpt layout
    sg = tmp_path / "sg.json"
    describe(str(inp), str(tmp_path / "sg.rows.jsonl"), base_url=server.url, sample=5, seed=1,
             instruction_data=str(sg), instruction_format="sharegpt", **FAST)
    conv = json.loads(sg.read_text())[0]["conversations"]
    assert [c["from"] for c in conv] == ["human", "gpt"] and conv[1]["value"] == mock_answer(conv[0]["value"])


def _write_litdata(root: Path, n: int, image=lambda i: bytes([0xFF, 0xD8, 0xFF]) + bytes([i]) * 40) -> list:
    """A prepared LitData dataset with the schema of rwkv_clip.schema."""
    from litdata.streaming.writer import BinaryWriter
    w = BinaryWriter(str(root), chunk_bytes="1MB")
    samples = []
    for i in range(n):
        smp = {"key": f"k{i}", "image": image(i), "text": f"raw text {i}",
               "synthetic_caption": f"a caption for image {i}", "generated_caption": "", "tags": "cat, sofa"}
        w[i] = smp
        samples.append(smp)
    w.done()
    w.merge()
    return samples


def test_litdata_input_carries_image_bytes(server, tmp_path):
    pytest.importorskip("litdata")
    samples = _write_litdata(tmp_path / "prepared", 6)
    out = tmp_path / "o.jsonl"
    s = describe(str(tmp_path / "prepared"), str(out), base_url=server.url, **FAST)
    assert s.generated == 6
    for r in read_out(out):
        smp = samples[r["row"]]
        assert r["key"] == smp["key"] and r["generated_caption"] == expected_answer(smp)
        assert not Path(r["image"]).is_absolute() and (out.parent / r["image"]).read_bytes() == smp["image"]
    with pytest.raises(ValueError, match="inside the input LitData"):
        describe(str(tmp_path / "prepared"), str(tmp_path / "prepared" / "o.jsonl"), base_url=server.url, **FAST)


def test_parquet_roundtrip(server, tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = make_rows(8, {2: "[[500x1]]", 3: "[[refuse]]"})
    for i, r in enumerate(rows):
        r["image"] = bytes([0x89]) + b"PNG\r\n\x1a\n" + bytes([i]) * 10
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    out = tmp_path / "o.parquet"
    s = describe(str(tmp_path / "in.parquet"), str(out), base_url=server.url, max_rows=5, **FAST)
    assert s.stopped and len(pq.read_table(out)) == 5  # a partial Parquet is written too
    s = describe(str(tmp_path / "in.parquet"), str(out), base_url=server.url, resume=True, **FAST)
    t = pq.read_table(out)
    assert s.complete and t.schema.field("image").type == pa.binary()
    got = {r["row"]: r for r in t.to_pylist()}
    assert sorted(got) == list(range(8))
    for i, r in got.items():
        assert r["image"] == rows[i]["image"] and r["key"] == rows[i]["key"]
    assert got[3]["status"] == "fallback" and got[2]["generated_caption"] == expected_answer(rows[2])


def test_parquet_without_pyarrow_is_a_clear_error(server, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError, as when not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "in.parquet").write_bytes(b"PAR1")
    with pytest.raises(ImportError, match="pip install pyarrow"):
        describe(str(tmp_path / "in.parquet"), str(tmp_path / "o.jsonl"), base_url=server.url, **FAST)
    inp = write_csv(tmp_path / "in.csv", make_rows(2))
    with pytest.raises(ImportError, match="pip install pyarrow"):
        describe(str(inp), str(tmp_path / "o.parquet"), base_url=server.url, **FAST)


def test_transformers_backend_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed (the dev extra has it)
    inp = write_csv(tmp_path / "in.csv", make_rows(2))
    with pytest.raises(ImportError, match="pip install transformers"):
        describe(str(inp), str(tmp_path / "o.csv"), backend="transformers", model=str(tmp_path), **FAST)


def _jpeg(i: int) -> bytes:
    import io as _io
    from PIL import Image
    buf = _io.BytesIO()
    Image.new("RGB", (16, 12), (10 * i, 100, 200)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("source", ["csv", "litdata"])
def test_output_feeds_prepare(server, tmp_path, source):
    prep = pytest.importorskip("rwkv_clip.datamodules.prepare")
    from litdata import StreamingDataset
    n = 5
    if source == "csv":
        (tmp_path / "images").mkdir()
        rows = make_rows(n, {2: "[[refuse]]"})
        for i, r in enumerate(rows):
            (tmp_path / r["image"]).write_bytes(_jpeg(i))
        inp = write_csv(tmp_path / "in.csv", rows)
        out = tmp_path / "described" / "rows.jsonl"  # another folder: the image paths must still resolve
    else:
        _write_litdata(tmp_path / "prepared", n, image=_jpeg)
        inp = tmp_path / "prepared"
        out = tmp_path / "described.jsonl"
    describe(str(inp), str(out), base_url=server.url, **FAST)
    prep.prepare(str(out), str(tmp_path / "ld"), num_workers=1, progress=False)
    ds = StreamingDataset(str(tmp_path / "ld" / "train"), shuffle=False)
    got = list(ds)
    assert len(got) == n
    want = {r["key"]: r["generated_caption"] for r in read_out(out)}
    assert {g["key"]: g["generated_caption"] for g in got} == want and all(want.values())


# ------------------------------------------------------------------------------------------------ the stages alone
def test_stages_alone_and_another_field_plugs_in(tmp_path):
    """read -> request -> record without describe(): a toy captioner writes synthetic_caption through the same
    Runner, OutputWriter/Recorder and load_done that the LLM rewrite uses."""
    from rwkv_clip.describe import (Backend, OutputPaths, OutputWriter, Outcome, Recorder, RequestFailed, RowReader,
                                    Runner, Stage, Summary, load_done)
    from rwkv_clip.schema import Columns

    class Captioner(Backend):  # stands in for a vision server: one "caption" per image path
        concurrency, batch_size = 3, 1

        def complete_batch(self, batch):
            if any("broken" in path for path in batch):
                raise RequestFailed("HTTP 500: the image could not be decoded")
            return [f"a photo of {path.rsplit('/', 1)[-1]}" for path in batch]

    class CaptionStage(Stage):
        field = "synthetic_caption"

        def __init__(self, backend):
            self.backend = backend

        def plan(self, row):
            return row["image"] or Outcome("fallback", row["text"], "no image")

        def ask(self, requests):
            return self.backend.complete_batch(requests)

        def judge(self, row, request, answer):
            return Outcome("generated", answer)

    rows = [{"id": f"r{i}", "url": f"img/{'broken' if i == 4 else i}.jpg" if i != 2 else "", "text": f"t{i}"}
            for i in range(7)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    reader = RowReader(str(inp), Columns(key="id", image="url"))
    assert len(reader) == 7 and next(reader.rows())[1]["image"] == str(tmp_path / "img" / "0.jpg")
    paths = OutputPaths.choose(str(inp), reader.fmt, str(tmp_path / "captions.jsonl"), None, None)
    summary = Summary(str(inp), paths.path, total=7)
    recorder = Recorder(OutputWriter(paths, "synthetic_caption"), summary, flush_every=1, progress=False,
                        keep_prompts=False)
    Runner(CaptionStage(Captioner())).run(((i, row) for i, row, _ in reader.rows() if i < 5), recorder.record)
    recorder.close()
    got = {r["row"]: r for r in read_out(tmp_path / "captions.jsonl")}
    assert sorted(got) == [0, 1, 2, 3, 4] and got[1]["synthetic_caption"] == "a photo of 1.jpg"
    assert got[1]["key"] == "r1" and got[1]["image"] == "img/1.jpg"  # relative to the output, as prepare wants
    assert (got[2]["status"], got[2]["reason"], got[4]["status"]) == ("fallback", "no image", "failed")
    assert (summary.generated, summary.fallback, summary.failed) == (3, 1, 1)
    done = load_done(paths.journal, paths.journal_fmt, 7, retry_failed=True)  # what a resume would skip
    assert [i for i in range(7) if done.done[i]] == [0, 1, 2, 3] and done.dropped == 1

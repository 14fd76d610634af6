"""`python -m rwkv_clip.describe` as a user runs it: --help, a run killed with SIGKILL, then resumed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rwkv_clip.command import parse
from rwkv_clip.describe import describe
from rwkv_clip.describe.__main__ import main
from rwkv_clip.describe.testing import MockChatServer, sigkill_when_written

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_help_documents_flags(capsys):
    # in-process (a subprocess start costs seconds); test_kill_and_resume runs the real `python -m` entry point
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--input", "--base_url", "--api_key_env", "--concurrency", "--prompt_template", "--resume",
                 "--instruction_data", "--text_key", "--max_retries"):
        assert flag in text
    assert "Requests in flight at once" in text  # per-flag help comes from the docstring


def test_dashes_bare_booleans_and_config_files(tmp_path):
    kw = parse(describe, ["--input", "x.csv", "--text-key", "alt", "--resume", "--progress", "false", "--max-rows=3",
                          "--resume"])
    assert (kw["text_key"], kw["resume"], kw["progress"], kw["max_rows"]) == ("alt", True, False, 3)
    cfg = tmp_path / "describe.yaml"
    cfg.write_text("input: rows.csv\nconcurrency: 4\nextra_body: {top_p: 0.9}\ntext_key: title\n")
    kw = parse(describe, ["--config", str(cfg), "--text_key", "alt"])  # the command line wins over the file
    assert (kw["input"], kw["concurrency"], kw["extra_body"], kw["text_key"]) == ("rows.csv", 4, {"top_p": 0.9}, "alt")


def test_kill_and_resume(tmp_path, capsys):
    n = 150
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": f"raw text {i}", "synthetic_caption": f"caption {i}",
                                       "tags": "a|b", "image": f"im/{i}.jpg"}) + "\n" for i in range(n)))
    out = tmp_path / "out.jsonl"
    with MockChatServer(delay=0.03) as server:
        cmd = [sys.executable, "-m", "rwkv_clip.describe", "--input", str(inp), "--output", str(out),
               "--base-url", server.url, "--concurrency", "2", "--flush-every", "1", "--progress", "false"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=ROOT)
        sigkill_when_written(proc, out, lines=10, timeout=90)
        first = [json.loads(line) for line in out.read_text().splitlines() if line.strip().endswith("}")]
        assert 10 <= len(first) < n
        # without --resume the existing output is refused, with a clear message
        assert main(["--input", str(inp), "--output", str(out), "--base_url", server.url]) == 1
        assert "--resume true" in capsys.readouterr().err
        rc = main(["--input", str(inp), "--output", str(out), "--base-url", server.url, "--concurrency", "8",
                   "--resume", "--progress", "false"])
        assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["row"] for r in rows) == list(range(n))  # complete, no duplicates
    assert all(r["status"] == "generated" for r in rows)
    assert "rows 150: generated 150" in capsys.readouterr().out


def test_subcommands_and_the_bare_form(tmp_path, capsys):
    for sub, flag in (("caption", "--local_prompt"), ("tags", "--vocabulary"), ("all", "--caption_model"),
                      ("rewrite", "--instruction_data")):
        with pytest.raises(SystemExit) as e:
            main([sub, "--help"])
        assert e.value.code == 0 and flag in capsys.readouterr().out
    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps({"text": "a dog on grass", "synthetic_caption": "a dog", "tags": "dog"}) + "\n")
    with MockChatServer() as s:
        assert main(["rewrite", "--input", str(rows), "--output", str(tmp_path / "a.jsonl"), "--base_url", s.url,
                     "--progress", "false"]) == 0
        assert main(["--input", str(rows), "--output", str(tmp_path / "b.jsonl"), "--base_url", s.url,
                     "--progress", "false"]) == 0
    a, b = (json.loads((tmp_path / f"{n}.jsonl").read_text()) for n in "ab")
    assert a == b and a["status"] == "generated"

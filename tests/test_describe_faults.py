"""describe under faults: a server that is down or echoes the key, broken input files, cut output, Ctrl-C.

Each test reproduces one finding of an outside check of the command's promises.
"""

import json
import signal
import threading
import time

import pytest

from rwkv_clip.describe import describe
from rwkv_clip.describe.__main__ import main
from rwkv_clip.describe.client import OpenAIChatClient, RequestFailed
from rwkv_clip.describe.testing import MockChatServer
from test_describe import FAST, make_rows, read_out, server, write_csv, write_jsonl  # noqa: F401 (fixture)


def test_rows_without_text_do_not_hide_a_dead_server(server, tmp_path):
    # Every other row has no text at all: it needs no request, and must not reset the run of failures.
    rows = make_rows(40)
    for r in rows[::2]:
        r.update(text="", synthetic_caption="", tags="")
    inp = write_csv(tmp_path / "in.csv", rows)
    server.force = "500"
    with pytest.raises(RuntimeError, match="5 rows failed in a row"):
        describe(str(inp), str(tmp_path / "o.csv"), base_url=server.url, concurrency=1,
                 max_consecutive_failures=5, **FAST)


def test_failed_rows_make_the_exit_status_nonzero(server, tmp_path, capsys):
    inp = write_csv(tmp_path / "in.csv", make_rows(4))
    server.force = "503"  # down for the whole (short) run: the stop never fires, every row fails
    rc = main(["--input", str(inp), "--output", str(tmp_path / "o.csv"), "--base_url", server.url,
               "--max_retries", "0", "--max_consecutive_failures", "0", "--progress", "false"])
    assert rc == 1
    assert "failed 4" in capsys.readouterr().out
    server.force = None
    rc = main(["--input", str(inp), "--output", str(tmp_path / "o.csv"), "--base_url", server.url,
               "--resume", "--progress", "false"])
    assert rc == 0  # retried on resume: all generated now


def test_api_key_is_redacted_wherever_the_body_is_cut():
    secret = "sk-0123456789abcdef"  # 19 characters
    with MockChatServer(api_key=secret) as s:
        client = OpenAIChatClient(s.url, model="mock-model", api_key=secret, max_retries=0, timeout=5)
        # "Bearer " + key lands at every position around the 300-character cut of the error message
        for prefix in range(0, 400):
            s.echo_prefix = prefix
            with pytest.raises(RequestFailed) as e:
                client.complete([{"role": "user", "content": "[[400]] a dog"}])
            msg = str(e.value)
            leaked = [secret[i:i + 4] for i in range(len(secret) - 3) if secret[i:i + 4] in msg]
            assert not leaked, (prefix, msg[-60:])
        client.close()


def test_csv_with_blank_lines_completes(server, tmp_path):
    rows = make_rows(5)
    inp = write_csv(tmp_path / "in.csv", rows)
    lines = inp.read_text().splitlines(keepends=True)
    inp.write_text("".join(lines[:3]) + "\n" + "".join(lines[3:]) + "\n\n")  # one blank line inside, two at the end
    s = describe(str(inp), str(tmp_path / "o.csv"), base_url=server.url, **FAST)
    assert s.complete and s.total == 5 and s.generated == 5
    assert sorted(int(r["row"]) for r in read_out(tmp_path / "o.csv")) == list(range(5))


def test_resume_after_a_cut_inside_a_multibyte_character(server, tmp_path):
    rows = make_rows(12)
    for r in rows:
        r["text"] += " — café ☕"
    inp = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "o.csv"
    describe(str(inp), str(out), base_url=server.url, max_rows=6, **FAST)
    # a crash (or a full disk) in the middle of the next record, inside the 3 bytes of "☕"
    record = '6,images/6.jpg,"raw text 6 — café ☕",'.encode("utf-8")
    with open(out, "ab") as f:
        f.write(record[:-3])
    s = describe(str(inp), str(out), base_url=server.url, resume=True, **FAST)
    got = read_out(out)
    assert s.complete and sorted(int(r["row"]) for r in got) == list(range(12))
    assert {r["text"] for r in got} == {r["text"] for r in rows}


def test_malformed_csv_rows_are_reported_and_counted(server, tmp_path, caplog):
    inp = tmp_path / "in.csv"
    inp.write_text(
        "key,text,synthetic_caption\n"
        "k0,raw text 0,a caption for image 0\n"
        "k1,raw text 1,a caption,EXTRA\n"               # line 3: one field too many
        "k2,raw text 2\n"                               # line 4: one field missing
        'k3,"raw text 3,a caption for image 3\n'        # line 5: a quote that is never closed ...
        "k4,raw text 4,a caption for image 4\n"
        'k5,"raw text 5",a caption for image 5\n'       # ... until line 7
        "k6,raw text 6,a caption for image 6\n",
        encoding="utf-8")
    s = describe(str(inp), str(tmp_path / "o.jsonl"), base_url=server.url, **FAST)
    got = {r["key"] for r in read_out(tmp_path / "o.jsonl")}
    assert got == {"k0", "k6"}  # nothing made up from a broken row
    reasons = {row: reason for row, _, reason in s.failed_rows}
    assert len(reasons) == 3 and s.failed == 3 and s.complete
    assert "in.csv:3" in reasons[1] and "4 fields" in reasons[1]
    assert "in.csv:4" in reasons[2] and "2 fields" in reasons[2]
    assert "in.csv:5" in reasons[3] and "quote" in reasons[3]
    assert "3 input rows could not be read" in caplog.text


def test_wrong_column_names_leave_no_output(server, tmp_path):
    inp = write_csv(tmp_path / "in.csv", [{"caption": "a dog on grass", "url": "x.jpg"}])
    out = tmp_path / "o.csv"
    with pytest.raises(ValueError, match="--text_key"):
        describe(str(inp), str(out), base_url=server.url, **FAST)
    assert not out.exists() and not (tmp_path / "o.csv.describe.json").exists()
    s = describe(str(inp), str(out), base_url=server.url, text_key="caption", **FAST)  # the user's rerun
    assert s.generated == 1


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_invalid_utf8_names_the_file_and_line(server, tmp_path, fmt):
    rows = make_rows(4)
    inp = (write_csv if fmt == "csv" else write_jsonl)(tmp_path / f"in.{fmt}", rows)
    data = inp.read_bytes().replace(b"raw text 2", b"raw t\xe9xt 2")  # Latin-1, not UTF-8
    inp.write_bytes(data)
    s = describe(str(inp), str(tmp_path / "o.jsonl"), base_url=server.url, **FAST)
    assert s.generated == 3 and s.failed == 1
    (row, _, reason), = s.failed_rows
    line = 4 if fmt == "csv" else 3
    assert row == 2 and f"in.{fmt}:{line}" in reason and "UTF-8" in reason


def test_ctrl_c_ends_in_flight_requests_at_once(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", make_rows(4, {i: "[[hang]]" for i in range(4)}))
    main_thread = threading.main_thread().ident
    # Python's own Ctrl-C handler, whatever an earlier test or the shell that started pytest left installed
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with MockChatServer(hang_seconds=60) as s:
            def interrupt_when_asked():
                deadline = time.time() + 30
                while time.time() < deadline and sum(s.seen.values()) < 2:
                    time.sleep(0.02)
                signal.pthread_kill(main_thread, signal.SIGINT)

            threading.Thread(target=interrupt_when_asked, daemon=True).start()
            with pytest.raises(KeyboardInterrupt):
                describe(str(inp), str(tmp_path / "o.jsonl"), base_url=s.url, model="mock-model", concurrency=2,
                         timeout=60, max_retries=0, progress=False)
            stopped = time.monotonic()
            while any(t.name.startswith("describe") for t in threading.enumerate()) and \
                    time.monotonic() - stopped < 20:
                time.sleep(0.05)
            waited = time.monotonic() - stopped
    finally:
        signal.signal(signal.SIGINT, previous)
    assert waited < 10, f"request threads still blocked {waited:.0f} s after Ctrl-C (timeout 60 s)"
    state = json.loads((tmp_path / "o.jsonl.describe.json").read_text())
    assert state["status"] == "incomplete" and state["stopped"] == "interrupted"

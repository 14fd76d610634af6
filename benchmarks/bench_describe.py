"""Description generation throughput, for each backend of each step, on this machine.

    python benchmarks/bench_describe.py [--delay 0.05] [--rows1 40] [--rows16 480] [--images 64]
        [--ckpt logs/demo/version_0/checkpoints/last.ckpt] [--blip base|tiny|none]

1. rewrite (`describe`): concurrency 16 vs 1 against a loopback chat server adding `--delay` s a request.
   Target: >= 8x the rows/s at concurrency 16 (ideal 16x: requests overlap fully, the client's own work is small).
2. captions/s and tags/s over the OpenAI-compatible HTTP path (`caption`, `tags --tagger openai`): the same loopback
   server, now taking each image inline, at concurrency 16. This is the client's own ceiling (reading, decoding and
   base64-encoding images, HTTP, writing rows); a real vision server is slower, and sets the real rate.
3. captions/s of the local transformers captioner (`caption --backend transformers`): a BLIP with random weights
   at the size of Salesforce/blip-image-captioning-base (`--blip base`: ViT-B/16 at 384 px, BERT-base decoder) or a
   tiny one, saved and loaded by directory, greedy decoding of 20 tokens per caption (end-of-text suppressed, so
   every caption costs the same as a full-length one).
4. tags/s of the CLIP tagger (`tags --tagger clip`) with the demo's trained model (`--ckpt`; default: the newest
   checkpoint under logs/demo) over the demo's 9-word vocabulary, on the demo's test images (LitData input).

Images: 64x64 PNG files (demo-sized); a step's rate is rows / wall time of the whole command, model load included
for 1-2 but not for 3-4 (their model load is timed apart).
"""

import argparse
import contextlib
import glob
import io
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from PIL import Image

from rwkv_clip.describe import describe
from rwkv_clip.describe.pipeline import caption, tags
from rwkv_clip.describe.testing import MockChatServer

DEMO_WORDS = ["red", "green", "blue", "yellow", "circle", "square", "triangle", "star", "cross"]


def run(server: MockChatServer, folder: Path, rows: int, concurrency: int) -> float:
    inp = folder / f"in_{concurrency}.jsonl"
    inp.write_text("".join(json.dumps({"text": f"raw text {i}", "synthetic_caption": f"a caption {i}",
                                       "tags": "dog, ball"}) + "\n" for i in range(rows)))
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the run's summary
        s = describe(str(inp), str(folder / f"out_{concurrency}.jsonl"), base_url=server.url, model="mock-model",
                     concurrency=concurrency, progress=False)
    dt = time.perf_counter() - t
    assert s.complete and s.generated == rows, s.format()
    return rows / dt


def image_rows(folder: Path, n: int) -> Path:
    (folder / "img").mkdir(exist_ok=True)
    colours = [(220, 30, 30), (30, 170, 40), (35, 70, 225), (240, 215, 20)]
    for i in range(n):
        im = Image.new("RGB", (64, 64), colours[i % 4])
        im.putpixel((i % 64, i // 64 % 64), (0, 0, 0))  # every image distinct
        im.save(folder / "img" / f"{i}.png")
    inp = folder / "images.jsonl"
    inp.write_text("".join(json.dumps({"key": f"k{i}", "image": f"img/{i}.png", "text": f"alt {i}"}) + "\n"
                           for i in range(n)))
    return inp


def timed(fn, **kw) -> tuple[float, float]:
    """(rows/s, seconds of setup) of one command: the rate leaves out the model load (or the server check)."""
    with contextlib.redirect_stdout(io.StringIO()):
        s = fn(**kw)
    assert s.complete and s.failed == 0, s.format()
    return s.processed / (s.elapsed - s.setup_s), s.setup_s


def build_blip(folder: Path, size: str) -> Path:
    """A BLIP captioner with random weights, saved as a model directory (no download)."""
    import inspect

    import torch
    import transformers

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(30519)]
    if size == "tiny":
        words = words[:64]
    vocab = {w: i for i, w in enumerate(words)}
    if "vocab" in inspect.signature(transformers.BertTokenizerFast.__init__).parameters:
        tok = transformers.BertTokenizerFast(vocab=vocab)
    else:
        (folder / "vocab.txt").write_text("\n".join(words) + "\n")
        tok = transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    if size == "base":  # Salesforce/blip-image-captioning-base
        text = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                    sep_token_id=tok.sep_token_id)
        vision = dict(image_size=384, patch_size=16)
        px = 384
    else:
        text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                    sep_token_id=tok.sep_token_id)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=32, patch_size=8)
        px = 32
    torch.manual_seed(0)
    model = transformers.BlipForConditionalGeneration(transformers.BlipConfig(text_config=text,
                                                                               vision_config=vision))
    with torch.no_grad():  # random weights: no end-of-text, so every caption is max_new_tokens long
        model.text_decoder.cls.predictions.bias[tok.all_special_ids] = -1e4
    model.save_pretrained(folder)
    transformers.BlipProcessor(transformers.BlipImageProcessor(size={"height": px, "width": px}), tok) \
        .save_pretrained(folder)
    return folder


def newest_demo_checkpoint() -> str:
    found = sorted(glob.glob("logs/demo/version_*/checkpoints/*.ckpt"), key=os.path.getmtime)
    return found[-1] if found else ""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--delay", type=float, default=0.05, help="seconds the server adds to every request")
    ap.add_argument("--rows1", type=int, default=40, help="rows for the concurrency-1 run")
    ap.add_argument("--rows16", type=int, default=480, help="rows for the concurrency-16 run")
    ap.add_argument("--images", type=int, default=480, help="images for the HTTP caption and tag runs")
    ap.add_argument("--blip", choices=["base", "tiny", "none"], default="base", help="transformers captioner size")
    ap.add_argument("--blip-images", type=int, default=32, help="images for the transformers captioner")
    ap.add_argument("--ckpt", default=None, help="CLIP checkpoint for the tagger (default: newest logs/demo one)")
    ap.add_argument("--demo-root", default="data/demo", help="the demo data (test split, tokenizer.json)")
    ap.add_argument("--device", default="auto", help="device for the local models")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("rwkv_clip").setLevel(logging.WARNING)
    results = {}
    with MockChatServer(delay=a.delay) as server, tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        r1 = run(server, tmp, a.rows1, 1)
        r16 = run(server, tmp, a.rows16, 16)
        ratio = r16 / r1
        print(f"server delay {a.delay * 1000:.0f} ms/request")
        print(f"rewrite, concurrency  1: {r1:7.1f} rows/s ({a.rows1} rows)")
        print(f"rewrite, concurrency 16: {r16:7.1f} rows/s ({a.rows16} rows)")
        print(f"ratio: {ratio:.1f}x (target >= 8x: {'ok' if ratio >= 8 else 'MISSED'})")

        inp = image_rows(tmp, a.images)
        results["caption openai"], _ = timed(caption, input=str(inp), output=str(tmp / "cap.jsonl"),
                                             base_url=server.url, concurrency=16, progress=False)
        results["tags openai"], _ = timed(tags, input=str(inp), output=str(tmp / "tags.jsonl"), tagger="openai",
                                          base_url=server.url, concurrency=16, progress=False)
        print(f"captions over HTTP, concurrency 16: {results['caption openai']:7.1f} captions/s "
              f"({a.images} 64x64 PNGs, {a.delay * 1000:.0f} ms/request)")
        print(f"tags over HTTP, concurrency 16:     {results['tags openai']:7.1f} tags/s")

        if a.blip != "none":
            model_dir = build_blip(tmp / "blip", a.blip)
            n = a.blip_images
            small = tmp / "blip_in.jsonl"
            small.write_text("".join(inp.read_text().splitlines(keepends=True)[:n]))
            rate, load = timed(caption, input=str(small), output=str(tmp / "blip.jsonl"), backend="transformers",
                               model=str(model_dir), batch_size=16, max_tokens=20, device=a.device, progress=False)
            results[f"caption transformers blip-{a.blip}"] = rate
            print(f"captions, transformers BLIP-{a.blip} (random weights, 20 tokens, batch 16, device "
                  f"{a.device}): {rate:7.2f} captions/s ({n} images; model load {load:.1f} s not counted)")

        ckpt = a.ckpt or newest_demo_checkpoint()
        if ckpt and os.path.isdir(os.path.join(a.demo_root, "test")):
            vocab = tmp / "words.txt"
            vocab.write_text("\n".join(DEMO_WORDS) + "\n")
            rate, load = timed(tags, input=os.path.join(a.demo_root, "test"), output=str(tmp / "clip.jsonl"),
                               model=ckpt, vocabulary=str(vocab), tokenizer=os.path.join(a.demo_root, "tokenizer.json"),
                               top_k=2, threshold=0.0, device=a.device, progress=False)
            results["tags clip demo"] = rate
            print(f"tags, CLIP tagger (demo model {ckpt}, 9 tags, batch 64, device {a.device}): "
                  f"{rate:7.1f} tags/s (demo test images; model load {load:.1f} s not counted)")
        else:
            print("tags, CLIP tagger: skipped (no demo checkpoint; run `python main.py fit --config "
                  "configs/demo.yaml` or pass --ckpt)")
    return results


if __name__ == "__main__":
    main()

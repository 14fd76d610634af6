"""Zero-shot metrics on small hand-computed cases (DESIGN §6 / CLIP_benchmark conventions)."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from rwkv_clip.callbacks.linear_probe import fit_logistic_regression, linear_probe
from rwkv_clip.callbacks.metrics import (
    classification_metrics,
    fill_template,
    retrieval_metrics,
    topk_captions,
    zeroshot_classifier,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SHIPPED = REPO / "rwkv_clip" / "data"


# ---------------------------------------------------------------- shipped data files


def test_shipped_files_shape():
    templates = json.loads((SHIPPED / "templates.json").read_text())
    classnames = json.loads((SHIPPED / "classnames.json").read_text())
    assert len(templates["imagenet1k"]) == 80 == len(set(templates["imagenet1k"]))
    assert len(templates["cifar10"]) == 18 and templates["cifar10"] == templates["cifar100"]
    assert all("{c}" in t for ts in templates.values() for t in ts)
    assert len(classnames["cifar10"]) == 10 and len(set(classnames["cifar100"])) == 100
    assert "aquarium fish" in classnames["cifar100"]  # torchvision's "aquarium_fish", spaced as in CLIP's prompts


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data (reference CLIP_benchmark files) is absent")
def test_shipped_files_match_clip_benchmark():
    ours = json.loads((SHIPPED / "templates.json").read_text())
    ref = json.loads((SHARED / "en_zeroshot_classification_templates.json").read_text())
    for key, templates in ours.items():
        assert templates == ref[key], key
    ours_c = json.loads((SHIPPED / "classnames.json").read_text())
    ref_c = json.loads((SHARED / "en_classnames.json").read_text())
    compared = [k for k in ours_c if k in ref_c]
    for key in compared:  # CLIP_benchmark takes CIFAR names from torchvision, so its file may not list them
        assert ours_c[key] == ref_c[key], key


def test_fill_template():
    assert fill_template("a photo of a {c}.", "cat") == "a photo of a cat."
    assert fill_template("itap of a {}.", "dog") == "itap of a dog."
    assert fill_template("a {c} of {c}", "x{0}") == "a x{0} of x{0}"  # no str.format on data
    with pytest.raises(ValueError, match="placeholder"):
        fill_template("a photo", "cat")


# ---------------------------------------------------------------- prompt ensembling


def _fake_text_tower():
    """Each prompt embeds to a fixed, unnormalised vector looked up by its text; the 'tokens' carry the index."""
    texts = {}

    def tokenize(batch):
        ids = [texts.setdefault(t, len(texts)) for t in batch]
        return torch.tensor(ids)[:, None]

    table = {
        "a c0": [3.0, 0.0], "the c0": [0.0, 1.0],  # norms 3 and 1: averaging raw vectors would favour the first
        "a c1": [1.0, 1.0], "the c1": [-1.0, 1.0],
        "a c2": [0.0, -2.0], "the c2": [0.0, -5.0],
    }

    def encode_text(tokens):
        inv = {v: k for k, v in texts.items()}
        return torch.tensor([table[inv[int(i)]] for i in tokens[:, 0]])

    return encode_text, tokenize


def test_prompt_ensembling_normalise_average_renormalise():
    encode, tok = _fake_text_tower()
    w = zeroshot_classifier(encode, tok, ["c0", "c1", "c2"], ["a {c}", "the {c}"], class_batch_size=2)
    assert w.shape == (2, 3)
    s = 0.5**0.5
    expected = torch.tensor([[s, s], [0.0, 1.0], [0.0, -1.0]]).T  # normalise each, average, renormalise
    assert torch.allclose(w, expected, atol=1e-6)
    w1 = zeroshot_classifier(encode, tok, ["c0", "c1", "c2"], ["a {c}", "the {c}"], class_batch_size=1)
    assert torch.allclose(w, w1)  # class batching does not change the classifier
    with pytest.raises(ValueError, match="templates"):
        zeroshot_classifier(encode, tok, ["c0"], [])


# ---------------------------------------------------------------- classification


def test_classification_metrics_hand_computed():
    logits = torch.tensor(
        [
            [9, 1, 2, 3, 4, 5],  # true 0: rank 0
            [9, 1, 2, 3, 4, 5],  # true 1: rank 5 (last)
            [1, 2, 9, 3, 4, 5],  # true 3: rank 3 (9, 5, 4 ahead)
            [1, 9, 2, 3, 4, 5],  # true 1: rank 0
        ],
        dtype=torch.float,
    )
    y = torch.tensor([0, 1, 3, 1])
    m = classification_metrics(logits, y)
    assert m["top1"] == pytest.approx(2 / 4)
    assert m["top5"] == pytest.approx(3 / 4)
    # per-class recall over classes present in y: class 0: 1/1, class 1: 1/2, class 3: 0/1
    assert m["mean_per_class_recall"] == pytest.approx((1 + 0.5 + 0) / 3)


def test_top5_only_with_five_classes():
    m = classification_metrics(torch.eye(4), torch.arange(4))
    assert "top5" not in m and m["top1"] == 1.0


def test_mean_per_class_recall_ignores_classes_without_samples():
    # Class 2 has no samples but is predicted once. sklearn's balanced_accuracy_score (CLIP_benchmark) ignores it;
    # torchmetrics' macro MulticlassAccuracy counts it as a class with recall 0.
    logits = F.one_hot(torch.tensor([0, 0, 1, 2]), 3).float()
    y = torch.tensor([0, 0, 1, 1])
    m = classification_metrics(logits, y)
    assert m["mean_per_class_recall"] == pytest.approx((1.0 + 0.5) / 2)
    tm = MulticlassAccuracy(num_classes=3, average="macro")(logits.argmax(1), y).item()
    assert tm == pytest.approx((1.0 + 0.5 + 0.0) / 3)  # the behaviour we deliberately do not use


def test_classification_tie_rule():
    # Equal logits: the lower class index ranks first (stable sort), for top-1 and top-k alike.
    logits = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0, 0.0]] * 2 + [[0.0] * 6])
    y = torch.tensor([0, 1, 5])
    m = classification_metrics(logits, y)
    assert m["top1"] == pytest.approx(1 / 3)  # row 0 hit, row 1 loses the tie to class 0, row 2: class 5 is last
    assert m["top5"] == pytest.approx(2 / 3)  # row 2: five tied classes with lower index come first
    assert m["mean_per_class_recall"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------- retrieval


def test_retrieval_several_captions_per_image():
    img = torch.eye(3)
    # captions 0,1 -> image 0; 2,3 -> image 1; 4 -> image 2
    txt = torch.tensor(
        [
            [1.0, 0.0, 0.0],  # best image 0 (correct)
            [0.0, 0.9, 0.1],  # best image 1, image 0 last (wrong)
            [0.0, 1.0, 0.0],  # correct
            [0.2, 0.0, 0.8],  # image 2, 0, then 1: its image ranks 3rd
            [0.5, 0.0, 0.4],  # image 0 first, then 2: rank 1
        ]
    )
    t2i = torch.tensor([0, 0, 1, 1, 2])
    m = retrieval_metrics(img, txt, t2i, ks=(1, 2, 3))
    assert m["image_retrieval_recall@1"] == pytest.approx(2 / 5)
    assert m["image_retrieval_recall@2"] == pytest.approx(3 / 5)
    assert m["image_retrieval_recall@3"] == pytest.approx(1.0)
    # image->text, scores = columns of txt. image 0: texts [1, 0, 0, .2, .5] -> best is its own caption 0: hit@1.
    # image 1: [0, .9, 1, 0, 0] -> caption 2 (its own) first: hit@1.
    # image 2: [0, .1, 0, .8, .4] -> caption 3 (image 1) first, then caption 4 (its own): hit@2.
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["text_retrieval_recall@2"] == pytest.approx(1.0)


def test_retrieval_any_caption_counts_for_image_to_text():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # image 0 has captions 0 (poor) and 2 (good); caption 1 belongs to image 1
    txt = torch.tensor([[-1.0, 0.0], [0.6, 0.8], [0.9, 0.1]])
    m = retrieval_metrics(img, txt, torch.tensor([0, 1, 0]), ks=(1,))
    assert m["text_retrieval_recall@1"] == pytest.approx(1.0)  # image 0: caption 2 first; image 1: caption 1 first
    assert m["image_retrieval_recall@1"] == pytest.approx(2 / 3)  # caption 0 prefers image 1


def test_retrieval_ties_and_chunking():
    # All scores equal: ranks follow the index (stable), so only the first candidate is found at K=1.
    img = torch.ones(4, 2) / 2**0.5
    txt = torch.ones(8, 2) / 2**0.5
    t2i = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    m = retrieval_metrics(img, txt, t2i, ks=(1, 3))
    assert m["image_retrieval_recall@1"] == pytest.approx(2 / 8)  # captions of image 0 only
    assert m["image_retrieval_recall@3"] == pytest.approx(6 / 8)
    assert m["text_retrieval_recall@1"] == pytest.approx(1 / 4)  # text 0 belongs to image 0
    assert m["text_retrieval_recall@3"] == pytest.approx(2 / 4)  # texts 0..2 cover images 0 and 1
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(37, 8), dim=1), F.normalize(torch.randn(90, 8), dim=1)
    t2i = torch.randint(0, 37, (90,))
    assert retrieval_metrics(img, txt, t2i, chunk=7) == retrieval_metrics(img, txt, t2i, chunk=1000)


def test_retrieval_matches_topk_without_ties():
    torch.manual_seed(1)
    img, txt = F.normalize(torch.randn(20, 6), dim=1), F.normalize(torch.randn(60, 6), dim=1)
    t2i = torch.arange(60) % 20
    m = retrieval_metrics(img, txt, t2i, ks=(1, 5))
    s = txt @ img.T
    for k in (1, 5):  # CLIP_benchmark's formulation with topk
        t2i_hit = (s.topk(k, dim=1).indices == t2i[:, None]).any(1).float().mean()
        pos = t2i[None, :] == torch.arange(20)[:, None]
        i2t_hit = pos.gather(1, s.T.topk(k, dim=1).indices).any(1).float().mean()
        assert m[f"image_retrieval_recall@{k}"] == pytest.approx(t2i_hit.item())
        assert m[f"text_retrieval_recall@{k}"] == pytest.approx(i2t_hit.item())
    assert topk_captions(img, txt, 3).shape == (20, 3)


def test_retrieval_bad_mapping():
    with pytest.raises(ValueError, match="text_to_image"):
        retrieval_metrics(torch.eye(2), torch.eye(2), torch.tensor([0, 2]))


# ---------------------------------------------------------------- linear probe


def _blobs(n_per, centers, noise, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([c + noise * torch.randn(n_per, len(c), generator=g) for c in centers])
    y = torch.arange(len(centers)).repeat_interleave(n_per)
    return x, y


def test_logistic_regression_reaches_optimum():
    x, y = _blobs(40, torch.eye(3) * 2, 1.0, 0)
    w, b = fit_logistic_regression(x, y, 3, weight_decay=1e-2, max_iter=200)
    w.requires_grad_(True)
    b.requires_grad_(True)
    loss = F.cross_entropy(x @ w + b, y) + 1e-2 * w.pow(2).sum()
    gw, gb = torch.autograd.grad(loss, [w, b])
    assert gw.abs().max() < 1e-4 and gb.abs().max() < 1e-4  # stationary point of a convex objective


def test_linear_probe_separable_and_weight_decay_choice():
    centers = torch.randn(5, 16, generator=torch.Generator().manual_seed(3)) * 3
    tr_x, tr_y = _blobs(30, centers, 1.0, 1)
    te_x, te_y = _blobs(20, centers, 1.0, 2)
    m = linear_probe(tr_x, tr_y, te_x, te_y, 5, weight_decays=[1e-4, 1e-2, 1.0, 100.0], max_iter=30)
    assert m["top1"] > 0.95 and m["top5"] == 1.0
    assert m["weight_decay"] < 100.0  # a huge penalty flattens the logits and loses on the hold-out
    # pure noise labels: held-out accuracy can't favour fitting, and test accuracy stays near chance
    g = torch.Generator().manual_seed(4)
    noise = linear_probe(torch.randn(200, 16, generator=g), torch.randint(0, 5, (200,), generator=g),
                         torch.randn(200, 16, generator=g), torch.randint(0, 5, (200,), generator=g), 5,
                         weight_decays=[1e-4, 1e-1], max_iter=30)
    assert noise["top1"] < 0.4

"""Benchmark metrics on small hand-computed cases, and against CLIP_benchmark's own functions where installed."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from rwkv_clip.callbacks.embed import Ranks, fill_template, zeroshot_classifier
from rwkv_clip.callbacks.metrics import (
    classification_metrics,
    fit_logistic_regression,
    linear_probe,
    retrieval_metrics,
    topk_captions,
)

HAS_CB = importlib.util.find_spec("clip_benchmark") is not None and importlib.util.find_spec("sklearn") is not None
needs_cb = pytest.mark.skipif(not HAS_CB, reason="clip_benchmark (and scikit-learn, which its metrics import) "
                                                 "is not installed")


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
    # Two ranks, each with its share of the classes (one of them padded), gathered back in order.
    shares = {}

    def fake_gather(rank):
        def gather(rows):
            shares[rank] = rows
            return torch.stack([shares.get(0, rows), rows]) if rank == 1 else torch.stack([rows, rows])
        return gather

    zeroshot_classifier(encode, tok, ["c0", "c1", "c2"], ["a {c}", "the {c}"], Ranks(0, 2, fake_gather(0)))
    w2 = zeroshot_classifier(encode, tok, ["c0", "c1", "c2"], ["a {c}", "the {c}"], Ranks(1, 2, fake_gather(1)))
    assert shares[0].shape == shares[1].shape == (2, 2)  # 3 classes: rank 1 pads its share to 2
    assert torch.allclose(w2, w)
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


def test_image_without_captions_is_a_miss():
    # CLIP_benchmark averages image->text recall over every image; one without captions can never be found.
    img = torch.eye(3)
    txt = torch.eye(3)[:2]
    m = retrieval_metrics(img, txt, torch.tensor([0, 1]), ks=(1, 3))
    assert m["text_retrieval_recall@3"] == pytest.approx(2 / 3) and m["image_retrieval_recall@1"] == 1.0


# ---------------------------------------------------------------- CLIP_benchmark's own functions


@needs_cb
def test_classifier_and_classification_metrics_match_clip_benchmark():
    from clip_benchmark.metrics import zeroshot_classification as cb
    from sklearn.metrics import balanced_accuracy_score

    torch.manual_seed(0)
    vocab = torch.randn(50, 16)

    class Model:
        def encode_text(self, tokens):
            return vocab[tokens].sum(1) * 3.0  # unnormalised on purpose

    def tokenize(texts):
        return torch.tensor([[sum(map(ord, w)) % 50 for w in t.split()][:4] + [0] * (4 - len(t.split()[:4]))
                             for t in texts])

    classnames = [f"class{i}" for i in range(7)]
    templates = ["a photo of a {c}.", "a {c}.", "itap of the {c}"]
    ours = zeroshot_classifier(Model().encode_text, tokenize, classnames, templates, class_batch_size=3)
    ref = cb.zero_shot_classifier(Model(), tokenize, classnames, templates, "cpu", amp=False)
    assert torch.allclose(ours, ref, atol=1e-6)

    images = F.normalize(torch.randn(300, 16), dim=-1)
    logits = 100.0 * images @ ours
    targets = torch.randint(0, 7, (300,))
    m = classification_metrics(logits, targets)
    # cb.accuracy's own last line fails under numpy 2 (float() of a 1-element array); its formulation:
    pred = logits.topk(5, 1, True, True)[1].t()
    correct = pred.eq(targets.view(1, -1).expand_as(pred))
    acc1, acc5 = (correct[:k].reshape(-1).float().sum().item() / len(targets) for k in (1, 5))
    assert m["top1"] == pytest.approx(acc1) and m["top5"] == pytest.approx(acc5)
    assert m["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(targets, logits.argmax(1)))


@needs_cb
def test_retrieval_metrics_match_clip_benchmark():
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

    torch.manual_seed(2)
    images = F.normalize(torch.randn(40, 8), dim=-1)
    texts = F.normalize(torch.randn(150, 8), dim=-1)
    text_to_image = torch.randint(0, 39, (150,))  # image 39 has no caption
    m = retrieval_metrics(images, texts, text_to_image, ks=(1, 5, 10), chunk=16)
    scores = texts @ images.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(150), text_to_image] = True
    for k in (1, 5, 10):  # exactly CLIP_benchmark's evaluate()
        t2i = (batchify(recall_at_k, scores, positive, 32, "cpu", k=k) > 0).float().mean().item()
        i2t = (batchify(recall_at_k, scores.T, positive.T, 32, "cpu", k=k) > 0).float().mean().item()
        assert m[f"image_retrieval_recall@{k}"] == pytest.approx(t2i)
        assert m[f"text_retrieval_recall@{k}"] == pytest.approx(i2t)

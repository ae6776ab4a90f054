"""Speed of the peer machines (LS, ELS, bbELS, PSPC-Square/Flex, SCFDM) against straightforward
numpy implementations, in the same run.

    python -m benchmarks.peers [--out benchmarks/results/peers.json] [--n 10000] [--quick]

Data: the first N Fashion-MNIST training images (``locality.data.load("fashion_mnist",
limit=N)``; synthetic smooth images of the same shape if that source is unavailable -- the JSON
says which), B = 8 queries (test images + noise) at ab = 0.5. One denoiser call per method at a
small and a large patch size: ours = the registered denoiser (first call incl. compilation, and
the median of repeats when a call is short); baseline = explicit patch extraction and explicit
distances in numpy float32 (loops over output pixels or squares, chunked over the training set
with an exact log-sum-exp merge). Where the baseline would take minutes it is timed on a subset of
output pixels per pixel class and scaled by the class sizes (``naive_pixels_timed``); the two
outputs are compared on the pixels the baseline computed (``max_abs_diff``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

from locality.denoisers import local_score, pspc, scfdm

AB = 0.5


# ----------------------------------------------------------------------------- data


def load_data(n: int, b: int):
    try:
        from locality import data

        train = np.asarray(data.load("fashion_mnist", limit=n))
        test = np.asarray(data.load("fashion_mnist", split="test", limit=b))
        source = f"fashion_mnist[:{n}] (locality.data)"
    except Exception as e:  # noqa: BLE001 - any missing source falls back to synthetic data
        rng = np.random.default_rng(0)
        raw = rng.normal(size=(n + b, 28, 28, 1))
        for _ in range(3):  # smooth a little so patches are correlated like images
            raw = (raw + np.roll(raw, 1, 1) + np.roll(raw, 1, 2)) / 3
        imgs = np.tanh(raw * 2).astype(np.float32)
        train, test = imgs[:n], imgs[n:]
        source = f"synthetic 28x28 (fashion_mnist unavailable: {type(e).__name__})"
    noise = np.random.default_rng(1).normal(size=test.shape).astype(np.float32)
    x_t = (np.sqrt(AB) * test + np.sqrt(1 - AB) * noise).astype(np.float32)
    return train, x_t, source


# ----------------------------------------------------------------------------- baselines


class LSE:
    """Exact running softmax average over chunks (numpy, float64 accumulators)."""

    def __init__(self):
        self.m = self.num = self.den = None

    def add(self, logits, values):  # logits [B, K], values [K, D]
        mx = logits.max(axis=1).astype(np.float64)
        if self.m is None:
            self.m, self.den = mx, np.zeros(len(mx))
            self.num = np.zeros((len(mx), values.shape[1]))
        new = np.maximum(self.m, mx)
        self.num *= np.exp(self.m - new)[:, None]
        self.den *= np.exp(self.m - new)
        w = np.exp(logits - new[:, None])
        self.num += w @ values
        self.den += w.sum(axis=1)
        self.m = new

    def value(self):
        return self.num / self.den[:, None]


def naive_softmax(x_win, patches_fn, centres_fn, n_chunks, ab=AB):
    """sum softmax(-||q - sqrt(ab) P||^2 / (2 (1 - ab))) centre, explicit distances."""
    acc = LSE()
    for c in range(n_chunks):
        p = patches_fn(c)  # [K, F]
        d = ((x_win[:, None, :] - np.sqrt(ab) * p[None]) ** 2).sum(-1)  # [B, K]
        acc.add(-d / (2 * (1 - ab)), centres_fn(c))
    return acc.value()


def windows(a, k, mode):
    """All k x k windows centred at every pixel of padded images: [N, H, W, k, k, C]."""
    r = k // 2
    ap = np.pad(a, ((0, 0), (r, r), (r, r), (0, 0)), mode="wrap" if mode == "wrap" else "constant")
    v = np.lib.stride_tricks.sliding_window_view(ap, (k, k), axis=(1, 2))  # [N, H, W, C, k, k]
    return np.moveaxis(v, 3, -1)


def naive_ls(train, x, k, pixels, chunk=2000):
    tw, xw = windows(train, k, "zeros"), windows(x, k, "zeros")
    out = {}
    for i, j in pixels:
        q = xw[:, i, j].reshape(len(x), -1)
        out[(i, j)] = naive_softmax(
            q,
            lambda c: tw[c * chunk : (c + 1) * chunk, i, j].reshape(-1, q.shape[1]),
            lambda c: train[c * chunk : (c + 1) * chunk, i, j],
            -(-len(train) // chunk),
        )
    return out


def naive_dictionary(train, x, k, pixels, locs_fn, query_mode, train_mode, chunk=200):
    """Patch dictionary at locations ``locs_fn(i, j)`` of every training image."""
    tw, xw = windows(train, k, train_mode), windows(x, k, query_mode)
    out = {}
    for i, j in pixels:
        locs = np.asarray(locs_fn(i, j))
        q = xw[:, i, j].reshape(len(x), -1)
        out[(i, j)] = naive_softmax(
            q,
            lambda c: tw[c * chunk : (c + 1) * chunk, locs[:, 0], locs[:, 1]].reshape(
                -1, q.shape[1]
            ),
            lambda c: train[c * chunk : (c + 1) * chunk, locs[:, 0], locs[:, 1]].reshape(
                -1, train.shape[-1]
            ),
            -(-len(train) // chunk),
        )
    return out


def naive_pspc(train, x, s, chunk=2000):
    b, h, w, c = x.shape
    total, count = np.zeros(x.shape), np.zeros((h, w))
    for u in range(h - s + 1):
        for v in range(w - s + 1):
            q = x[:, u : u + s, v : v + s].reshape(b, -1)
            mean = naive_softmax(
                q,
                lambda cc: train[cc * chunk : (cc + 1) * chunk, u : u + s, v : v + s].reshape(
                    -1, q.shape[1]
                ),
                lambda cc: train[cc * chunk : (cc + 1) * chunk, u : u + s, v : v + s].reshape(
                    -1, q.shape[1]
                ),
                -(-len(train) // chunk),
            )
            total[:, u : u + s, v : v + s] += mean.reshape(b, s, s, c)
            count[u : u + s, v : v + s] += 1
    return total / count[None, :, :, None]


def naive_flex(train, x, mask_cols, pixels, chunk=2000):
    b, h, w, c = x.shape
    tf, xf = train.reshape(len(train), h * w, c), x.reshape(b, h * w, c)
    out = {}
    for i, j in pixels:
        p = i * w + j
        sel = np.flatnonzero(mask_cols[:, p])
        q = xf[:, sel].reshape(b, -1)
        out[(i, j)] = naive_softmax(
            q,
            lambda cc: tf[cc * chunk : (cc + 1) * chunk, sel].reshape(-1, q.shape[1]),
            lambda cc: tf[cc * chunk : (cc + 1) * chunk, p],
            -(-len(train) // chunk),
        )
    return out


def naive_scfdm(train, x, xi, sigma_s, chunk=2000):
    tf = train.reshape(len(train), -1)
    out = 0.0
    for r in range(xi.shape[0]):
        q = (x + sigma_s * xi[r]).reshape(len(x), -1)
        out = out + naive_softmax(
            q,
            lambda c: tf[c * chunk : (c + 1) * chunk],
            lambda c: tf[c * chunk : (c + 1) * chunk],
            -(-len(tf) // chunk),
        )
    return (out / xi.shape[0]).reshape(x.shape)


# ----------------------------------------------------------------------------- timing


def time_ours(den, x, repeat_below=5.0, repeats=3):
    t0 = time.perf_counter()
    out = np.asarray(jax.block_until_ready(den(x, AB)))
    first = time.perf_counter() - t0
    if first > repeat_below:
        return out, first, first, 1
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(den(x, AB))
        ts.append(time.perf_counter() - t0)
    return out, first, float(np.median(ts)), repeats


def sample_pixels(classes: np.ndarray, per_class: int, seed=0):
    """A few pixels of every class value; returns (pixels, {class: (count, timed pixels)})."""
    rng = np.random.default_rng(seed)
    pix, groups = [], {}
    for c in np.unique(classes):
        ii, jj = np.nonzero(classes == c)
        pick = rng.choice(len(ii), size=min(per_class, len(ii)), replace=False)
        sel = [(int(ii[p]), int(jj[p])) for p in pick]
        groups[int(c)] = (len(ii), sel)
        pix += sel
    return pix, groups


def run_pixel_case(name, den, x, naive_fn, classes, per_class):
    ours, first, med, reps = time_ours(den, x)
    pix, groups = sample_pixels(classes, per_class)
    t_naive, outs = 0.0, {}
    for _, (count, sel) in groups.items():
        t0 = time.perf_counter()
        outs.update(naive_fn(sel))
        t_naive += (time.perf_counter() - t0) * count / len(sel)
    diff = max(float(np.abs(ours[:, i, j] - outs[(i, j)]).max()) for (i, j) in pix)
    res = {
        "ours_first_call_s": first,
        "ours_median_s": med,
        "ours_repeats": reps,
        "naive_s": t_naive,
        "naive_pixels_timed": len(pix),
        "naive_extrapolated": len(pix) < classes.size,
        "ratio_naive_over_ours": t_naive / med,
        "max_abs_diff": diff,
    }
    print(
        f"{name:28s} ours {med:9.3f}s (first {first:8.2f}s)  naive {t_naive:9.2f}s"
        f"{' (extrap.)' if res['naive_extrapolated'] else ''}  x{t_naive / med:7.1f}"
        f"  maxdiff {diff:.1e}",
        flush=True,
    )
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "peers.json"),
    )
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="N = 500, for a smoke run")
    args = ap.parse_args()
    n = 500 if args.quick else args.n
    train, x, source = load_data(n, args.batch)
    h, w, _ = train.shape[1:]
    print(f"data: {source}, train {train.shape}, queries {x.shape}", flush=True)
    results = {}
    everywhere = np.zeros((h, w), int)
    inner = lambda k: [(a, b) for a in range(k // 2, h - k // 2) for b in range(k // 2, w - k // 2)]

    for k in (3, 15):
        den = local_score.make_ls(train=train, patch_size=k)
        results[f"ls_k{k}"] = run_pixel_case(
            f"ls k={k}",
            den,
            x,
            lambda pix: naive_ls(train, x, k, pix),
            everywhere,
            per_class=h * w if k == 3 else 64,
        )
    for k, dictionary in ((3, "wrapped"), (15, "valid")):
        den = local_score.make_els(train=train, patch_size=k, dictionary=dictionary)
        if dictionary == "wrapped":
            locs = [(a, b) for a in range(h) for b in range(w)]
        else:
            locs = inner(k)
        results[f"els_k{k}_{dictionary}"] = run_pixel_case(
            f"els k={k} {dictionary}",
            den,
            x,
            lambda pix: naive_dictionary(
                train,
                x,
                k,
                pix,
                lambda i, j: locs,
                "wrap",
                "wrap" if dictionary == "wrapped" else "valid",
            ),
            everywhere,
            per_class=4,
        )
    for k in (3, 15):
        r = k // 2
        den = local_score.make_bbels(train=train, patch_size=k)
        ir, ic = range(r, h - r), range(r, w - r)

        def locs_fn(i, j, r=r, ir=ir, ic=ic):
            re, ce = i < r or i > h - 1 - r, j < r or j > w - 1 - r
            if not re and not ce:
                return [(a, b) for a in ir for b in ic]
            if re and not ce:
                return [(i, b) for b in ic]
            if ce and not re:
                return [(a, j) for a in ir]
            return [(i, j)]

        results[f"bbels_k{k}"] = run_pixel_case(
            f"bbels k={k}",
            den,
            x,
            lambda pix, locs_fn=locs_fn: naive_dictionary(
                train, x, k, pix, locs_fn, "zeros", "zeros"
            ),
            local_score.bbels_classes(h, w, k),
            per_class=4,
        )
    for s in (3, 14):
        den = pspc.make_pspc_square(train=train, patch_size=s, flip=False)
        ours, first, med, reps = time_ours(den, x)
        t0 = time.perf_counter()
        ref = naive_pspc(train, x, s)
        t_naive = time.perf_counter() - t0
        diff = float(np.abs(ours - ref).max())
        results[f"pspc_square_s{s}"] = {
            "ours_first_call_s": first,
            "ours_median_s": med,
            "ours_repeats": reps,
            "naive_s": t_naive,
            "naive_extrapolated": False,
            "ratio_naive_over_ours": t_naive / med,
            "max_abs_diff": diff,
            "flip": False,
        }
        print(
            f"{'pspc_square s=' + str(s):28s} ours {med:9.3f}s  naive {t_naive:9.2f}s  "
            f"x{t_naive / med:7.1f}  maxdiff {diff:.1e}",
            flush=True,
        )
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    for k in (3, 15):  # flex with box crops of side k (masks given; no network needed)
        box = (
            (np.abs(ii.ravel()[:, None] - ii.ravel()[None]) <= k // 2)
            & (np.abs(jj.ravel()[:, None] - jj.ravel()[None]) <= k // 2)
        ).astype(np.float32)
        den = pspc.make_pspc_flex(train=train, masks=box, abs=[AB], flip=False)
        results[f"pspc_flex_box{k}"] = run_pixel_case(
            f"pspc_flex box {k}",
            den,
            x,
            lambda pix, box=box: naive_flex(train, x, box, pix),
            everywhere,
            per_class=64,
        )
    den = scfdm.make_scfdm(train=train, num_samples=10, sigma_s=0.1)
    ours, first, med, reps = time_ours(den, x)
    xi = np.asarray(scfdm.smoothing_noise(den.key, AB, x.shape, 10))
    t0 = time.perf_counter()
    ref = naive_scfdm(train, x, xi, 0.1)
    t_naive = time.perf_counter() - t0
    results["scfdm_R10"] = {
        "ours_first_call_s": first,
        "ours_median_s": med,
        "ours_repeats": reps,
        "naive_s": t_naive,
        "naive_extrapolated": False,
        "ratio_naive_over_ours": t_naive / med,
        "max_abs_diff": float(np.abs(ours - ref).max()),
    }
    print(
        f"{'scfdm R=10':28s} ours {med:9.3f}s  naive {t_naive:9.2f}s  x{t_naive / med:7.1f}",
        flush=True,
    )

    out = {
        "data": source,
        "num_train": int(train.shape[0]),
        "batch": int(x.shape[0]),
        "image_shape": list(train.shape[1:]),
        "ab": AB,
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()],
            "load_average_at_end": list(os.getloadavg()),
        },
        "notes": "ours_median_s: median of repeats after the first call when the first call "
        "took < 5 s, else the first call (incl. compilation). naive_s: numpy float32, "
        "explicit patches and distances; when naive_extrapolated, timed on "
        "naive_pixels_timed output pixels per pixel class and scaled by class size. "
        "max_abs_diff over the pixels the baseline computed.",
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

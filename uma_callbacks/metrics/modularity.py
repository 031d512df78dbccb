r"""Modularity of each MLP block's weight graph (Filan et al. 2021, "Clusterability in neural networks").

The graph of one MLP block: nodes are its input dimensions (d), hidden units (I) and
output dimensions (d_out); the edge between input j and hidden unit h weighs
sum_{W in input projections} |W[h, j]| (a gated MLP has two input projections, gate and
up, that both connect j to h), the edge between h and output o weighs |W_out[o, h]|.
There are no other edges, so the graph is bipartite: X = inputs and outputs
(d + d_out nodes), Y = hidden units (I nodes), with biadjacency

    B [d + d_out, I] = [ sum_W |W|^T ; |W_out| ].

Spectral clustering (Ng, Jordan & Weiss 2002): the k = ``n_clusters`` eigenvectors of the
smallest eigenvalues of the normalised Laplacian L = I - D^{-1/2} A D^{-1/2} are the
largest of N = D^{-1/2} A D^{-1/2}; for a bipartite graph the eigenpairs of N are
(sigma, [u; v] / sqrt 2) with (sigma, u, v) the singular triplets of
M = D_X^{-1/2} B D_Y^{-1/2}. So a truncated SVD of M (randomised subspace iteration from a
seeded block, :func:`top_singular`) gives the embedding: rows of U for X nodes, rows of V for Y nodes,
each row scaled to unit length, then seeded k-means (k-means++, ``n_init`` restarts).

Newman's modularity of a partition c of a weighted graph A with degrees k_i and
2m = sum_ij A_ij:

    Q = (1 / 2m) sum_ij [A_ij - k_i k_j / 2m] delta(c_i, c_j)
      = sum_c [ e_c / 2m - (a_c / 2m)^2 ],

e_c = sum of A_ij over i, j both in c, a_c = sum of k_i over i in c. For the bipartite
graph, e_c = 2 sum of B over rows and columns in c, and 2m = 2 sum(B).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import numpy as np
import scipy.sparse as sp
import torch

from uma_callbacks.core import seeds, validate
from uma_callbacks.metrics.base import ComputeContext, Cost, Metric, MetricResult
from uma_callbacks.metrics.time_cost import UnitCosts


# ---------------------------------------------------------------------- pure functions
def modularity_q(adjacency: sp.spmatrix | sp.sparray | np.ndarray, labels: np.ndarray) -> float:
    """Newman's Q of the partition ``labels [n]`` of a symmetric weighted graph ``adjacency [n, n]``.

    Self-loops count once in A_ii (as networkx counts them twice in the degree and twice
    in 2m: A_ii here is that doubled value, i.e. the diagonal of a symmetric matrix).

    Example:
        >>> a = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], float)
        >>> modularity_q(a, np.array([0, 0, 1, 1]))
        0.5
    """
    a = sp.csr_array(adjacency, dtype=np.float64)
    labels = np.asarray(labels)
    _, comm = np.unique(labels, return_inverse=True)
    two_m = float(a.sum())
    if two_m <= 0:
        return math.nan
    degree = np.asarray(a.sum(axis=1)).reshape(-1)
    k = int(comm.max()) + 1
    member = sp.csr_array((np.ones(len(comm)), (np.arange(len(comm)), comm)), shape=(len(comm), k))
    within = np.asarray((member.T @ a @ member).diagonal()).reshape(-1)
    totals = np.bincount(comm, weights=degree, minlength=k)
    return float(within.sum() / two_m - ((totals / two_m) ** 2).sum())


def bipartite_modularity_q(biadjacency: np.ndarray, row_labels: np.ndarray, col_labels: np.ndarray) -> float:
    """Q of the bipartite graph with ``biadjacency [R, C]`` (rows and columns are distinct nodes).

    The same value as :func:`modularity_q` on [[0, B], [B^T, 0]] with labels
    ``[row_labels, col_labels]``, without building the (R + C)^2 matrix: float64 sums of B
    by (row cluster, column cluster).

    Example:
        >>> bipartite_modularity_q(np.eye(2), np.array([0, 1]), np.array([0, 1]))
        0.5
    """
    b = np.asarray(biadjacency)
    total = float(b.sum(dtype=np.float64))
    if total <= 0:
        return math.nan
    _, comm = np.unique(np.concatenate([row_labels, col_labels]), return_inverse=True)
    rows, cols = comm[: b.shape[0]], comm[b.shape[0] :]
    k = int(comm.max()) + 1
    within = sum(float(b[rows == c][:, cols == c].sum(dtype=np.float64)) for c in range(k))
    degree = np.bincount(rows, weights=b.sum(1, dtype=np.float64), minlength=k) + np.bincount(
        cols, weights=b.sum(0, dtype=np.float64), minlength=k
    )
    two_m = 2.0 * total
    return float(2.0 * within / two_m - ((degree / two_m) ** 2).sum())


def bipartite_adjacency(biadjacency: np.ndarray) -> sp.csr_array:
    """The symmetric sparse adjacency [[0, B], [B^T, 0]] [R + C, R + C] (zeros dropped)."""
    b = sp.csr_array(np.asarray(biadjacency, dtype=np.float64))
    return sp.csr_array(sp.block_array([[None, b], [b.T, None]], format="csr"))


def kmeans(points: np.ndarray, n_clusters: int, seed: int, n_init: int = 4, max_iter: int = 100) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding, the best of ``n_init`` runs (least inertia).

    Deterministic for a given ``seed`` (a local ``np.random.default_rng``; the global RNG is
    untouched). An emptied cluster keeps its previous centre.

    Args:
        points: ``[n, dim]``.
        n_clusters: k (<= n).
        seed: seeds the k-means++ draws.
        n_init: restarts.
        max_iter: Lloyd iterations per run.

    Returns:
        ``labels [n]`` in ``0..k-1``.

    Example:
        >>> kmeans(np.array([[0.0], [0.1], [5.0], [5.1]]), 2, seed=0).tolist() in ([0, 0, 1, 1], [1, 1, 0, 0])
        True
    """
    x = np.asarray(points, dtype=np.float64)
    rng = np.random.default_rng(seed)
    best, best_inertia = None, math.inf
    sq = (x**2).sum(1)
    for _ in range(n_init):
        centres = _kmeans_pp(x, n_clusters, rng)
        labels = np.zeros(len(x), dtype=np.int64)
        for it in range(max_iter):
            dist = sq[:, None] - 2.0 * x @ centres.T + (centres**2).sum(1)[None, :]
            new = dist.argmin(1)
            if it > 0 and np.array_equal(new, labels):
                break
            labels = new
            for c in range(n_clusters):
                members = labels == c
                if members.any():
                    centres[c] = x[members].mean(0)
        dist = sq[:, None] - 2.0 * x @ centres.T + (centres**2).sum(1)[None, :]
        inertia = float(np.maximum(dist[np.arange(len(x)), labels], 0).sum())
        if inertia < best_inertia:
            best, best_inertia = labels.copy(), inertia
    assert best is not None
    return best


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centres = np.empty((k, x.shape[1]))
    centres[0] = x[rng.integers(len(x))]
    closest = ((x - centres[0]) ** 2).sum(1)
    for c in range(1, k):
        total = closest.sum()
        idx = rng.choice(len(x), p=closest / total) if total > 0 else rng.integers(len(x))
        centres[c] = x[idx]
        closest = np.minimum(closest, ((x - centres[c]) ** 2).sum(1))
    return centres


def top_singular(
    m: np.ndarray, k: int, seed: int, oversample: int = 10, iterations: int = 8
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top-k singular triplets of ``m [R, C]`` by randomised subspace iteration (Halko et al. 2011).

    A seeded Gaussian block of k + ``oversample`` columns, ``iterations`` power iterations
    (each re-orthonormalised by QR), then the SVD of the small projected matrix. Block
    products (BLAS-3) instead of Lanczos matrix-vector products: a d 896 / 4864 MLP graph
    takes a fraction of a second.

    Returns:
        ``(u [R, k], s [k], vt [k, C])``, s descending.
    """
    rng = np.random.default_rng(seed)
    width = min(k + oversample, min(m.shape))
    y = m @ rng.standard_normal((m.shape[1], width)).astype(m.dtype)
    for _ in range(iterations):
        q, _ = np.linalg.qr(y)
        z, _ = np.linalg.qr(m.T @ q)
        y = m @ z
    q, _ = np.linalg.qr(y)
    ub, s, vt = np.linalg.svd(q.T @ m, full_matrices=False)
    return (q @ ub)[:, :k], s[:k], vt[:k]


def spectral_coclusters(
    biadjacency: np.ndarray, n_clusters: int, seed: int, n_init: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised-Laplacian spectral clustering of a bipartite graph (see the module docstring).

    Args:
        biadjacency: B ``[R, C]``, non-negative.
        n_clusters: k, 2 <= k < min(R, C).
        seed: seeds the SVD start vector and k-means.
        n_init: k-means restarts.

    Returns:
        ``(row_labels [R], col_labels [C])``; nodes of zero degree get label 0.

    Raises:
        ValueError: k out of range.
    """
    b = np.asarray(biadjacency, dtype=np.float32)
    r, c = b.shape
    if not 2 <= n_clusters < min(r, c):
        raise ValueError(f"Modularity.n_clusters must be in [2, {min(r, c)}) for a [{r}, {c}] block; got {n_clusters}")
    dx, dy = b.sum(1, dtype=np.float64), b.sum(0, dtype=np.float64)
    sx = np.where(dx > 0, 1.0 / np.sqrt(np.where(dx > 0, dx, 1.0)), 0.0).astype(np.float32)
    sy = np.where(dy > 0, 1.0 / np.sqrt(np.where(dy > 0, dy, 1.0)), 0.0).astype(np.float32)
    m = b * sx[:, None] * sy[None, :]
    u, _, vt = top_singular(m, n_clusters, seed)
    emb = np.concatenate([u, vt.T], 0).astype(np.float64)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = np.divide(emb, norms, out=np.zeros_like(emb), where=norms > 0)
    labels = kmeans(emb, n_clusters, seed, n_init=n_init)
    labels[np.concatenate([dx, dy]) <= 0] = 0
    return labels[:r], labels[r:]


# ---------------------------------------------------------------------- MLP blocks
@dataclass
class MLPBlock:
    """One MLP block's weights as ``[out, in]`` matrices.

    Attributes:
        inputs: the input projections, each ``[I, d]`` (gate and up, or one).
        output: the output projection ``[d_out, I]``.
    """

    inputs: list[torch.Tensor]
    output: torch.Tensor

    def biadjacency(self, seed: int | None = None) -> np.ndarray:
        """B ``[d + d_out, I]`` (float64 for float64 weights, else float32).

        With ``seed`` each matrix's entries are shuffled first (the null model; a local
        ``torch.Generator``).
        """
        mats = [w.detach().abs() for w in [*self.inputs, self.output]]
        dtype = torch.float64 if any(m.dtype == torch.float64 for m in mats) else torch.float32
        mats = [m.to("cpu", dtype) for m in mats]
        if seed is not None:
            gen = torch.Generator().manual_seed(seed)
            mats = [m.reshape(-1)[torch.randperm(m.numel(), generator=gen)].reshape(m.shape) for m in mats]
        inputs = mats[0] if len(mats) == 2 else torch.stack(mats[:-1]).sum(0)
        return torch.cat([inputs.t(), mats[-1]], 0).numpy()


def _linears(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(name, weight [out, in])`` of the direct children that are linear maps, in order."""
    out = []
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Linear):
            out.append((name, child.weight))
        elif type(child).__name__ == "Conv1D" and hasattr(child, "weight"):  # GPT-2: weight [in, out]
            out.append((name, cast(torch.Tensor, child.weight).t()))
    return out


def mlp_blocks(model: torch.nn.Module) -> dict[str, MLPBlock]:
    """The MLP blocks of a transformer, by module name.

    Recognised: a module named ``*mlp`` (Llama, Qwen2, Mistral, GPT-2, Phi: the last linear
    child is the output projection, the earlier ones whose output size is its input size
    the input projections), and BERT's ``intermediate.dense`` / ``output.dense`` pair
    (named ``<layer>.intermediate``).

    Example:
        >>> mlp = torch.nn.Module()
        >>> mlp.up, mlp.down = torch.nn.Linear(3, 8), torch.nn.Linear(8, 3)
        >>> m = torch.nn.Module(); m.mlp = mlp
        >>> [(k, len(b.inputs), tuple(b.output.shape)) for k, b in mlp_blocks(m).items()]
        [('mlp', 1, (3, 8))]
    """
    blocks: dict[str, MLPBlock] = {}
    for name, module in model.named_modules():
        if name.rpartition(".")[2].lower().endswith("mlp"):
            lins = _linears(module)
            if len(lins) >= 2:
                out = lins[-1][1]
                ins = [w for _, w in lins[:-1] if w.shape[0] == out.shape[1]]
                if ins and all(w.shape[1] == ins[0].shape[1] for w in ins):
                    blocks[name] = MLPBlock(ins, out)
        inter, output = getattr(module, "intermediate", None), getattr(module, "output", None)
        inter_dense, output_dense = getattr(inter, "dense", None), getattr(output, "dense", None)
        if isinstance(inter_dense, torch.nn.Linear) and isinstance(output_dense, torch.nn.Linear):
            w_in, w_out = inter_dense.weight, output_dense.weight
            if w_out.shape[1] == w_in.shape[0]:
                blocks[f"{name}.intermediate" if name else "intermediate"] = MLPBlock([w_in], w_out)
    return blocks


# ---------------------------------------------------------------------- the metric
class Modularity(Metric):
    r"""Newman's Q of the spectral partition of each MLP block's weight graph, and its shuffled baseline.

    For every MLP block m (:func:`mlp_blocks`), with B its biadjacency (module docstring):

    - ``layers/<m>/q``: Q of the partition of B into ``n_clusters`` clusters by
      normalised-Laplacian spectral clustering (:func:`spectral_coclusters`);
    - ``layers/<m>/q_shuffled``: the same for B built from each weight matrix with its
      entries shuffled (``torch.randperm`` from a local generator seeded by seed and block index): a null baseline
      (about 0 for an unstructured graph);
    - ``mean_q``, ``mean_q_shuffled``: their means over blocks.

    Weights only: the probe is not used (no forward pass). The spectral step runs on CPU
    in float32 (a truncated SVD of the [d + d_out, I] normalised biadjacency), Q in float64;
    a d_model 896 / 4864-unit MLP takes about a second per partition on one core.

    Args:
        n_clusters: k >= 2.
        seed: seeds the SVD start vector, k-means and the shuffles.
        n_init: k-means restarts.
        shuffle_baseline: compute ``q_shuffled`` (doubles the time).
        chunk_size: unused (no probe); accepted for the common interface.
        timeout_seconds: stop between blocks past this time.

    Raises:
        ValueError: ``n_clusters < 2`` or a bad field (named); at measure time, a model
            without recognised MLP blocks, or ``n_clusters`` too large for a block.

    Example:
        >>> mlp = torch.nn.Module()
        >>> mlp.up, mlp.down = torch.nn.Linear(4, 8, bias=False), torch.nn.Linear(8, 4, bias=False)
        >>> with torch.no_grad():
        ...     _ = mlp.up.weight.copy_(torch.block_diag(torch.ones(4, 2), torch.ones(4, 2)))
        ...     _ = mlp.down.weight.copy_(torch.block_diag(torch.ones(2, 4), torch.ones(2, 4)))
        >>> m = torch.nn.Module(); m.mlp = mlp
        >>> r = Modularity(n_clusters=2).compute(m, [{"x": torch.zeros(1, 4)}], lambda m, b: b["x"].sum(-1))
        >>> round(r.scalars["layers/mlp/q"], 6)
        0.5
    """

    name = "modularity"
    needs_grad = False
    #: host memory per block (B in float64 and float32, the SVD work) is not on the device; no probe pass
    cost = Cost(forward_only=True)

    def __init__(
        self,
        n_clusters: int = 4,
        *,
        seed: int = seeds.DEFAULT_SEED,
        n_init: int = 4,
        shuffle_baseline: bool = True,
        chunk_size: int | None = None,
        timeout_seconds: float | None = None,
    ) -> None:
        super().__init__(chunk_size=chunk_size, timeout_seconds=timeout_seconds)
        validate.check_int("Modularity.n_clusters", n_clusters, 2, 10_000)
        validate.check_seed("Modularity.seed", seed)
        validate.check_int("Modularity.n_init", n_init, 1, 1000)
        if type(shuffle_baseline) is not bool:
            raise ValueError(f"Modularity.shuffle_baseline must be a bool; got {shuffle_baseline!r}")
        self.n_clusters = n_clusters
        self.seed = seed
        self.n_init = n_init
        self.shuffle_baseline = shuffle_baseline

    def block_q(self, block: MLPBlock, index: int) -> dict[str, float]:
        """``q`` (and ``q_shuffled``) of one block."""
        b = block.biadjacency()
        rows, cols = spectral_coclusters(b, self.n_clusters, self.seed, self.n_init)
        out = {"q": bipartite_modularity_q(b, rows, cols)}
        if self.shuffle_baseline:
            bs = block.biadjacency(seed=self.seed * 100_003 + index)
            rows, cols = spectral_coclusters(bs, self.n_clusters, self.seed, self.n_init)
            out["q_shuffled"] = bipartite_modularity_q(bs, rows, cols)
        return out

    def time_cost(self, units: UnitCosts) -> float:
        """Weights only, no pass over the probe: a tenth of a forward."""
        return 0.1 * units.forward

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        blocks = mlp_blocks(ctx.model)
        if not blocks:
            raise ValueError(
                "Modularity: no MLP blocks found (modules named '*mlp' with linear children, or BERT's "
                "intermediate/output pair)"
            )
        scalars: dict[str, float] = {}
        per: dict[str, list[float]] = {"q": [], "q_shuffled": []}
        for i, (name, block) in enumerate(blocks.items()):
            for key, value in self.block_q(block, i).items():
                scalars[f"layers/{name}/{key}"] = value
                per[key].append(value)
            ctx.check_time(blocks_done=i + 1)
        scalars["mean_q"] = float(np.mean(per["q"]))
        if per["q_shuffled"]:
            scalars["mean_q_shuffled"] = float(np.mean(per["q_shuffled"]))
        ctx.meta.update(n_blocks=len(blocks), n_clusters=self.n_clusters, seed=self.seed)
        return MetricResult(name=self.name, scalars=scalars)

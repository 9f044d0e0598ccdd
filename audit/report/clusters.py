"""Strategy clusters per class (SpRAy-style): the part of a class that looks somewhere else.

Spectral relevance analysis (Lapuschkin et al., "Unmasking Clever Hans predictors", 2019)
clusters a class's explanation maps; each cluster is a sub-strategy of the model for that
class, shown with its share. A shortcut used by a third of a class is a cluster, not a
class-level rate. Here, per class and explained target kind:

1. each ok row's map (the consensus by default) is upsampled bilinearly to a ``GRID`` x ``GRID``
   grid over the model's input frame and scaled to unit mass (where the map puts its weight);
2. at most ``SAMPLE_CAP`` rows (a seeded sample) form a symmetric k-nearest-neighbour graph,
   ``k = clip(round(sqrt(n)), 5, 30)``, whose normalised Laplacian's smallest eigenvalues
   ``l_0 <= l_1 <= ...`` give the number of clusters by the eigengap,
   ``k* = argmax (l_k - l_{k-1})`` over ``k <= K`` (K = ``clusters_max``) with ``l_{k-1} <=
   SPLIT_EIGENVALUE``, and whose first ``k*`` eigenvectors, rows normalised, are split by
   k-means (Ng, Jordan and Weiss). The bound keeps the eigengap to nearly disconnected parts
   of the graph: measured on unimodal classes of noisy maps, the plain eigengap split 100
   maps in two and 40 in four, while every planted sub-strategy (10-40% of a class, one or
   two of them, 20 to 1,000 maps) had its eigenvalues below 0.01 and a single strategy
   none but ``l_0`` below 0.035;
3. the other rows join the cluster of their nearest sampled neighbours;
4. clusters under ``cluster_floor`` rows are folded into *other*; clusters are numbered by size;
5. clusters whose mean maps point at the same region (:func:`region_name`) are merged: where
   the model looks is what an audit asks, and a region names a strategy across runs.

A class of (near-)identical maps is one cluster. Everything is deterministic for a seed.
Each cluster's region is named from its mean map (:func:`region_name`), and metadata values
over-represented in it are found with a one-sided Fisher exact test against the rest of the
class, Bonferroni-corrected over the values tested (:func:`enriched_metadata`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from audit.report.aggregate import BaseRate, Rate, Reliance, group_bootstrap, lesion_groups, reliance
from audit.report.thresholds import Thresholds

GRID = 16
SAMPLE_CAP = 1000  # rows clustered spectrally per class; the rest join their nearest neighbours
OTHER = -1
SPLIT_EIGENVALUE = 0.02
SIGNIFICANCE = 0.05


@dataclass
class Clustering:
    """``labels`` (n,): cluster 0, 1, ... by size, or OTHER; ``embedding`` (m, 2): the spectral
    coordinates of the ``embedded`` rows (positions into the input), for a picture."""

    labels: np.ndarray
    embedding: np.ndarray
    embedded: np.ndarray
    eigenvalues: np.ndarray

    @property
    def count(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0


def cluster_maps(maps: np.ndarray, clusters_max: int = 6, floor: int = 5, seed: int = 0) -> Clustering:
    """Cluster (n, GRID*GRID) maps into sub-strategies; see the module's docstring."""
    n = len(maps)
    mass = _unit_mass(maps)
    if n < 2 * floor or clusters_max <= 1 or np.ptp(mass, axis=0).max(initial=0.0) < 1e-6:
        return Clustering(
            np.zeros(n, dtype=int), np.zeros((min(n, SAMPLE_CAP), 2)), np.arange(min(n, SAMPLE_CAP)), np.zeros(0)
        )
    from scipy.linalg import eigh
    from scipy.sparse.csgraph import laplacian
    from sklearn.cluster import KMeans
    from sklearn.neighbors import KNeighborsClassifier, kneighbors_graph

    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, SAMPLE_CAP, replace=False)) if n > SAMPLE_CAP else np.arange(n)
    points = mass[sample]
    m = len(points)
    neighbours = int(np.clip(round(np.sqrt(m)), 5, 30))
    graph = kneighbors_graph(points, min(neighbours, m - 1), mode="connectivity", include_self=False)
    graph = graph.maximum(graph.T)
    top = min(clusters_max, m - 1)
    values, vectors = eigh(laplacian(graph, normed=True).toarray(), subset_by_index=[0, top])
    splits = int(np.sum(values[:-1] <= SPLIT_EIGENVALUE))  # k may go up to this
    k = int(np.argmax(np.diff(values)[:splits])) + 1
    sampled = np.zeros(m, dtype=int)
    if k > 1:
        embedding = vectors[:, :k] / np.maximum(np.linalg.norm(vectors[:, :k], axis=1, keepdims=True), 1e-12)
        sampled = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(embedding)
    labels = np.zeros(n, dtype=int)
    labels[sample] = sampled
    rest = np.setdiff1d(np.arange(n), sample)
    if len(rest) and k > 1:
        vote = KNeighborsClassifier(n_neighbors=min(5, m)).fit(points, sampled)
        labels[rest] = vote.predict(mass[rest])
    return Clustering(
        number_by_size(labels, floor),
        vectors[:, 1:3] if vectors.shape[1] >= 3 else _pad(vectors[:, 1:]),
        sample,
        values,
    )


def merge_same_regions(maps: np.ndarray, clustering: Clustering) -> Clustering:
    """Clusters whose mean maps point at the same region are one strategy for an audit (where the
    model looks): they are merged, and the clusters numbered by size again."""
    names = {
        c: region_name(maps[clustering.labels == c].mean(axis=0).reshape(GRID, GRID)) for c in range(clustering.count)
    }
    first = {}
    merged = np.array([first.setdefault(names[c], c) if c != OTHER else OTHER for c in clustering.labels], dtype=int)
    if len(first) == clustering.count:
        return clustering
    labels = merged.copy()
    real = merged != OTHER
    labels[real] = number_by_size(merged[real], floor=1)
    return Clustering(labels, clustering.embedding, clustering.embedded, clustering.eigenvalues)


def _bounds(low: float, high: float) -> tuple[float | None, float | None]:
    return (None, None) if np.isnan(low) else (float(low), float(high))


def _unit_mass(maps: np.ndarray) -> np.ndarray:
    """Each map scaled to sum 1 (an empty map spreads evenly): where the map puts its weight."""
    maps = np.nan_to_num(np.asarray(maps, dtype=np.float64)).clip(min=0)
    total = maps.sum(axis=1, keepdims=True)
    even = np.full_like(maps, 1.0 / max(maps.shape[1], 1))
    return np.where(total > 0, maps / np.where(total > 0, total, 1), even)


def number_by_size(labels: np.ndarray, floor: int) -> np.ndarray:
    """Clusters renumbered 0, 1, ... by decreasing size; those under ``floor`` rows become OTHER."""
    ids, counts = np.unique(labels, return_counts=True)
    order = [i for i, c in sorted(zip(ids, counts), key=lambda pair: (-pair[1], pair[0])) if c >= floor]
    mapping = {old: new for new, old in enumerate(order)}
    return np.array([mapping.get(label, OTHER) for label in labels], dtype=int)


def _pad(vectors: np.ndarray) -> np.ndarray:
    return np.concatenate([vectors, np.zeros((len(vectors), 2 - vectors.shape[1]))], axis=1)


_ROWS = ("top", "middle", "bottom")
_COLUMNS = ("left", "centre", "right")


def region_name(mean_map: np.ndarray) -> str:
    """Where a mean map (h, w) in the input frame puts its mass, in words.

    The frame is cut in thirds both ways. The 3x3 cell with the most mass names the region
    ("bottom-right corner", "centre", "top edge" for the middle of the top third ...), unless
    its third holds most of the mass spread along it ("bottom edge" for a ruler along the
    bottom), or no cell holds more than twice an even share ("spread over the image"). Only
    the map's upper half counts (``max(0, map - max / 2)``): where it is hot, not its haze."""
    weights = np.nan_to_num(np.asarray(mean_map, dtype=np.float64))
    weights = (weights - weights.max(initial=0.0) / 2).clip(min=0)
    total = weights.sum()
    if total <= 0:
        return "nowhere (empty maps)"
    h, w = weights.shape
    rows = np.array_split(np.arange(h), 3)
    cols = np.array_split(np.arange(w), 3)
    cells = np.array([[weights[np.ix_(r, c)].sum() for c in cols] for r in rows]) / total
    r, c = np.unravel_index(np.argmax(cells), cells.shape)
    if cells[r, c] < 2 / 9:
        return "spread over the image"
    row_share, col_share = cells[r].sum(), cells[:, c].sum()
    if r != 1 and row_share >= 0.5 and cells[r, c] < 0.6 * row_share:
        return f"{_ROWS[r]} edge"
    if c != 1 and col_share >= 0.5 and cells[r, c] < 0.6 * col_share:
        return f"{_COLUMNS[c]} edge"
    if (r, c) == (1, 1):
        return "centre"
    if r == 1:
        return f"{_COLUMNS[c]} edge"
    if c == 1:
        return f"{_ROWS[r]} edge"
    return f"{_ROWS[r]}-{_COLUMNS[c]} corner"


def enriched_metadata(
    metadata: pd.DataFrame, inside: np.ndarray, max_values: int = 50, alpha: float = SIGNIFICANCE
) -> list[dict]:
    """Metadata values over-represented in a cluster against the rest of its class.

    For every categorical column (at most ``max_values`` distinct values) and value, a one-sided
    Fisher exact test of the 2x2 table (in the cluster or not) x (has the value or not); a value is
    reported when its Bonferroni-corrected p-value (times the number of values tested) is below
    ``alpha``. Returns ``{column, value, share_in_cluster, share_in_class, p}``, strongest first."""
    from scipy.stats import fisher_exact

    inside = np.asarray(inside, dtype=bool)
    if inside.all() or not inside.any():
        return []
    tests = []
    for column in metadata.columns:
        values = metadata[column].astype("string").fillna("missing")
        if values.nunique() > max_values or values.nunique() < 2:
            continue
        for value in values.unique():
            has = (values == value).to_numpy()
            table = [
                [int((has & inside).sum()), int((~has & inside).sum())],
                [int((has & ~inside).sum()), int((~has & ~inside).sum())],
            ]
            if table[0][0] == 0:
                continue
            p = fisher_exact(table, alternative="greater").pvalue
            tests.append((column, str(value), has[inside].mean(), has.mean(), p))
    found = [
        {
            "column": c,
            "value": v,
            "share_in_cluster": round(float(a), 4),
            "share_in_class": round(float(b), 4),
            "p": float(min(1.0, p * len(tests))),
        }
        for c, v, a, b, p in tests
        if p * len(tests) < alpha
    ]
    return sorted(found, key=lambda item: item["p"])


@dataclass
class Strategy:
    """One strategy cluster of a class: ``index`` 0, 1, ... by size (OTHER for the pooled small
    ones), its rows' share of the class's clustered rows, the region its mean map points at,
    and the same evidence a class gets (off-object rate of the clustered method, context
    reliance against the class's base rate, accuracy), plus over-represented metadata and the
    image ids closest to its mean map."""

    index: int
    region: str
    n: int
    share: float
    mean_map: np.ndarray
    off_object: Rate
    context: Reliance | None
    accuracy: float | None
    metadata: list[dict]
    examples: list[str]
    rows: pd.Index
    flags: list = field(default_factory=list)  # judged like a class (audit.report.flags.judge_clusters)

    @property
    def title(self) -> str:
        return "other" if self.index == OTHER else f"cluster {self.index + 1}"


@dataclass
class Strategies:
    """A class's clusters, and the clustering they came from (for the embedding picture)."""

    method: str
    clusters: list[Strategy]
    clustering: Clustering

    @property
    def split(self) -> bool:
        """More than one strategy: a cluster says something the class-level rates do not."""
        return sum(s.index != OTHER for s in self.clusters) > 1


def class_strategies(
    rows: pd.DataFrame,
    own: pd.Series,
    bases: dict[str, BaseRate],
    label: int,
    indicators: pd.DataFrame,
    maps: np.ndarray,
    method: str,
    thresholds: Thresholds,
    metadata_columns: list[str],
    seed: int = 0,
) -> Strategies | None:
    """Cluster the ok rows of one class and target kind (``own`` within ``rows``, one target kind)
    by their maps; ``bases``: the class's base rates (:func:`audit.report.aggregate.base_rates`),
    against which each cluster's context reliance is judged.

    ``maps`` (len(rows), GRID*GRID) aligned with ``rows``; ``indicators`` as
    :func:`audit.report.aggregate.indicators` for the same rows. None when nothing is clustered."""
    clustered = own & rows["status"].eq("ok") & ~np.isnan(maps).any(axis=1)
    index = rows.index[clustered.to_numpy()]
    if len(index) == 0:
        return None
    points = maps[clustered.to_numpy()]
    clustering = merge_same_regions(
        points, cluster_maps(points, thresholds.clusters_max, thresholds.cluster_floor, seed)
    )
    mass = _unit_mass(points)
    rng = np.random.default_rng([seed, label])
    found = []
    for cluster in sorted(set(clustering.labels), key=lambda c: (c == OTHER, c)):
        inside = clustering.labels == cluster
        members = index[inside]
        member_mask = pd.Series(rows.index.isin(members), index=rows.index)
        off = indicators.loc[members, f"off_object:{method}"].to_numpy()
        low, high = group_bootstrap(
            off, lesion_groups(rows.loc[members]), thresholds.bootstrap, thresholds.confidence, rng
        )
        defined = off[~np.isnan(off)]
        hidden = {k: v for k, v in bases.items() if k == "object_hidden"}
        context = reliance(rows, member_mask, hidden, thresholds, rng).get("object_hidden")
        correct = rows.loc[members, "correct"].dropna()
        mean = points[inside].mean(axis=0).reshape(GRID, GRID)
        closest = np.argsort(((mass[inside] - mass[inside].mean(axis=0)) ** 2).sum(axis=1), kind="stable")[:3]
        found.append(
            Strategy(
                index=int(cluster),
                region="other strategies" if cluster == OTHER else region_name(mean),
                n=int(inside.sum()),
                share=float(inside.mean()),
                mean_map=mean,
                off_object=Rate(float(defined.sum()), len(defined), *_bounds(low[0], high[0])),
                context=context,
                accuracy=float(correct.astype(bool).mean()) if len(correct) else None,
                metadata=enriched_metadata(rows.loc[index, metadata_columns], inside) if metadata_columns else [],
                examples=[str(rows.at[members[i], "image_id"]) for i in closest],
                rows=members,
            )
        )
    return Strategies(method, found, clustering)

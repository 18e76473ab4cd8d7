"""``flywheel reward relabel``: a detector judges every episode of a store that this detector version has not judged
yet. Its labels are appended to the store's label log; no episode file is rewritten, and earlier labels (a person's,
an older detector's) stay beside the new ones."""

from __future__ import annotations

from typing import Any, Callable

from flywheel.contracts import SuccessDetector
from flywheel.evaluation import label_episodes
from flywheel.store import EpisodeStore


def relabel(store: EpisodeStore, detector: SuccessDetector, batch: int = 64,
            progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    labels = store.labels()
    judged = lambda eid: any(lab.source == "detector" and lab.version == detector.version  # noqa: E731
                             for lab in labels.get(eid, []))
    todo = [p for p in store.paths() if not judged(p.stem)]
    approved = 0
    for start in range(0, len(todo), batch):
        episodes = [store.read(p, labels.get(p.stem), with_ground_truth=False) for p in todo[start:start + batch]]
        new = label_episodes(detector, episodes)
        store.add_labels([(ep.id, lab) for ep, lab in zip(episodes, new)])
        approved += sum(lab.success for lab in new)
        if progress is not None:
            progress(min(start + batch, len(todo)), len(todo))
    return {"store": str(store.root), "detector": detector.version, "labelled": len(todo),
            "approved": approved, "already_judged": len(store.paths()) - len(todo)}

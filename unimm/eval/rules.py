"""Does a set of objects satisfy a spec? GenEval's decision rules, on our objects.

The same rules judge ground-truth scene objects (symbolic) and detected objects
(pixels), so the checker's validation isolates the detector.

- Every group needs at least `count` objects of its shape (and colour, if named).
- Counting is exact: no more objects of that shape than asked for.
- Position: the largest matching object of the first group must lie in the named
  relation to the largest matching object of the second (GenEval compares its
  most confident detections).
- Objects the spec does not mention are allowed, as in GenEval.
"""

from __future__ import annotations

from typing import Sequence

from unimm.data.scenes import Obj, relations
from unimm.data.spec import Spec


def _area(o: Obj) -> float:
    x0, y0, x1, y1 = o.box
    return (x1 - x0) * (y1 - y0)


def check(spec: Spec, objects: Sequence[Obj]) -> tuple[bool, str]:
    """(passed, reason); the reason names the first unmet requirement."""
    matched = []
    for g in spec.groups:
        same_shape = [o for o in objects if o.shape == g.shape]
        found = [o for o in same_shape if g.color is None or o.color == g.color]
        what = f"{g.color + ' ' if g.color else ''}{g.shape}"
        if len(found) < g.count:
            return False, f"expected >= {g.count} {what}, found {len(found)}"
        if spec.exact_count and len(same_shape) != g.count:
            return False, f"expected exactly {g.count} {g.shape}, found {len(same_shape)}"
        matched.append(max(found, key=_area))
    if spec.relation:
        rels = relations(matched[0], matched[1])
        if spec.relation not in rels:
            return False, f"expected {spec.relation}, found {sorted(rels) or 'no clear relation'}"
    return True, "ok"

"""Single-shot deep-learning autofocus on the scan path: the closed loop per field.

Closed loop per field: capture at the z the focus surface predicts, let the
model estimate the signed defocus from that one frame, and only if the
estimate is outside the tolerance move to ``z - defocus`` and capture again
(at most ``max_moves`` times). Fields without content (glass, near-empty: the
model's content head, or the classifier's "background") get no focus
estimate; they keep the surface's z and are never added to it.

The surface (:mod:`runtime.focus.surface`) predicts where to start; the model
(:class:`runtime.ml.tasks.AutofocusModel`) estimates from the captured frame.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

F = TypeVar("F")  # a captured frame as the caller holds it: an array, or a ring slot handle


@dataclass(frozen=True)
class SingleShotResult(Generic[F]):
    z_um: float  # where the kept frame was captured
    captures: int
    frame: F
    predicted_defocus_um: float | None  # the first estimate (at the surface's z)
    final_defocus_um: float | None  # the estimate for the kept frame
    focus_estimate_um: float | None  # z - final defocus, when the estimate is trusted
    converged: bool


@dataclass(frozen=True)
class SingleShotFocus:
    """Capture, estimate, move only when outside ``tolerance_um``; at most ``max_moves`` moves."""

    tolerance_um: float = 0.25
    max_moves: int = 3
    max_step_um: float = 12.0

    def focus(
        self,
        estimate: Callable[[F], float | None],
        capture_at: Callable[[float], F],
        release: Callable[[F], None],
        start_z_um: float,
        first: F,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> SingleShotResult[F]:
        """``first``: the frame already captured at ``start_z_um`` (the caller classified it).

        ``capture_at(z)`` moves the stage to z and captures; ``estimate`` is the model's signed
        defocus (None: no content). Frames are handles the caller may have to give back
        (ring slots): every frame but the returned one is passed to ``release``, so at most two
        are held at any time.
        """
        z, frame = start_z_um, first
        captures = 0
        d = estimate(frame)
        first_estimate = d
        for _ in range(self.max_moves):
            if d is None or abs(d) <= self.tolerance_um or should_stop():
                break
            z_new = z - float(np.clip(d, -self.max_step_um, self.max_step_um))
            frame_new = capture_at(z_new)
            captures += 1
            d_new = estimate(frame_new)
            # A correct model shrinks |d| by far more than this at every move. If it does not,
            # the estimate is not to be trusted here (pen ink, a fold, a bubble rim, or a stack
            # edge): stop and keep the best capture rather than walk z away.
            if d_new is None or abs(d_new) > 0.8 * abs(d):
                release(frame_new)
                break
            release(frame)
            z, frame, d = z_new, frame_new, d_new
        converged = d is not None and abs(d) <= self.tolerance_um
        # The residual estimate refines the focus point the surface learns (not the frame we keep).
        focus = z - d if d is not None and abs(d) <= 1.0 else None
        return SingleShotResult(z, captures, frame, first_estimate, d, focus, converged)

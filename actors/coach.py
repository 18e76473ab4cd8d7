"""Verbal coaching (issue 37): a person standing by who corrects the robot in words, not by taking the controls.

A policy with a subtask head (π0.5-style: flywheel/vla/model.py ``SubtaskHead``) names the subtask it is about to
do, then acts on those words. Where it names something that is not left to do, the coach says what is ("put the
blue block in the blue bowl", "now close the drawer"), and the policy acts on the coach's words until that subtask
is done. The rollout records every utterance with who and when (``info["coaching"]``) and marks the steps it was in
force (``Extras.COACHING``). Learners take it in hindsight: what the policy should have been doing there.

In simulation ``ScriptedCoach`` plays the person from the simulator's own record of the subtasks; on a robot the
page's operator (flywheel/page.py) types the words.
"""

from __future__ import annotations

from typing import Any


class ScriptedCoach:
    """A coach who watches the words the policy acts on and speaks only when they name nothing left to do: a valid
    other order (another unsorted block first) is let be, as a person would. The words it says are the subtask the
    simulator sees under way (``subtask_index``), and they hold until that subtask is no longer under way."""

    who = "scripted coach"

    def correct(self, env: Any, words: str) -> str | None:
        """The correction to say to a policy about to act on ``words`` in ``env``, or None to stay quiet."""
        names, left = env.subtasks(), env.subtasks_left()
        if not left or words in [names[k] for k in left]:
            return None
        return names[env.subtask_index()]

    @staticmethod
    def holds(env: Any, under_way: int) -> bool:
        """Whether words said while subtask ``under_way`` was under way still apply."""
        return env.subtask_index() == under_way

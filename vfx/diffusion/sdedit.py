"""SDEdit (`edit --method sdedit`): denoise from part-way up the schedule instead of from the top.

`start` is a noise level as a fraction of the training schedule's range (1.0: the noisiest
timestep, near 0: the last one). The edit starts at the schedule's timestep nearest
`start * num_train_timesteps` and runs every step after it. The reference slices its schedule
with `timesteps[int(1 - start * steps):]`, which starts two steps below that for 50 steps and
start 0.9 (t = 861 where 901 is nearest); this module does not reproduce that.
"""

from __future__ import annotations

import numpy as np

from vfx.errors import BadInput



def start_index(timesteps: list[int], start: float, num_train_timesteps: int) -> int:
    """Index in the descending `timesteps` of the one nearest `start` of the range (ties: the noisier)."""
    if not 0 <= start <= 1:
        raise BadInput(f"--start {start} must lie in [0, 1] (a fraction of the noise schedule)")
    target = start * num_train_timesteps
    return min(range(len(timesteps)), key=lambda i: (abs(timesteps[i] - target), i))


def fresh_noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """One seeded Gaussian noise map shared by every frame (independent noise per frame would flicker)."""
    return np.random.default_rng([seed, 0x5DED17]).standard_normal(shape, dtype=np.float32)

"""What `lazypull check` reports: one disagreement, and whether it was repaired."""

from dataclasses import asdict, dataclass


@dataclass
class Finding:
    problem: str
    path: str
    detail: str
    repairable: bool
    repaired: bool = False

    def to_json(self) -> dict:
        return asdict(self)

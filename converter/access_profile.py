"""Access profiles: which files a workload read first, recorded on nodes.

The schema is `access_profile.schema.json` beside this module (documented in
docs/access-profile.md). The converter turns a profile into per-layer hot-file
lists; the snapshotter writes profiles in the same shape. The data model lives
in `oci.access_profile`, shared by both; this module keeps its names here.
"""

from oci.access_profile import (
    SCHEMA_VERSION,
    AccessProfile,
    FileAccess,
    ImageProfile,
    ProfileError,
    parse_profile,
)

__all__ = [
    "SCHEMA_VERSION",
    "AccessProfile",
    "FileAccess",
    "ImageProfile",
    "ProfileError",
    "parse_profile",
]

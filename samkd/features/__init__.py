"""Teacher-feature store: run the expensive teachers once, train from the HDF5 file many times.

See `samkd.features.schema` for the file layout and `samkd.features.writer` for the
resumable, crash-safe and distributed writing design.
"""

from samkd.features.images import (
    changed_image,
    describe_image_file,
    index_images,
    known_images,
    wait_for_index,
)
from samkd.features.inspect import (
    FeatureFileReport,
    PseudoMaskReport,
    TapReport,
    TeacherReport,
    inspect_feature_file,
    render_report,
)
from samkd.features.join import join_shards, missing_shards
from samkd.features.lock import OutputLockedError
from samkd.features.reader import (
    FeatureChecksumError,
    FeatureStore,
    flip_tap,
    read_decoder_state_dict,
)
from samkd.features.schema import (
    SCHEMA_VERSION,
    ExtractionPlan,
    FeatureStoreError,
    ImageRecord,
    TapSpec,
    TeacherSpec,
    file_sha256,
    plan_from_settings,
    planned_bytes,
    teacher_taps,
)
from samkd.features.storage import StorageError
from samkd.features.writer import (
    FeatureBatch,
    FeatureWriter,
    SpaceNeeded,
    ensure_free_space,
    extract_features,
    open_for_extraction,
    space_needed,
)
from samkd.files import format_bytes

__all__ = [
    "SCHEMA_VERSION",
    "ExtractionPlan",
    "FeatureBatch",
    "FeatureChecksumError",
    "FeatureFileReport",
    "FeatureStore",
    "FeatureStoreError",
    "FeatureWriter",
    "ImageRecord",
    "OutputLockedError",
    "PseudoMaskReport",
    "SpaceNeeded",
    "StorageError",
    "TapReport",
    "TapSpec",
    "TeacherReport",
    "TeacherSpec",
    "changed_image",
    "describe_image_file",
    "ensure_free_space",
    "extract_features",
    "file_sha256",
    "flip_tap",
    "format_bytes",
    "index_images",
    "inspect_feature_file",
    "join_shards",
    "known_images",
    "missing_shards",
    "open_for_extraction",
    "plan_from_settings",
    "planned_bytes",
    "read_decoder_state_dict",
    "render_report",
    "space_needed",
    "teacher_taps",
    "wait_for_index",
]

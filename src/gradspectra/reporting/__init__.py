"""Reporting: the JSONL batch record and the TensorBoard views (layouts, figures, tables)."""

from gradspectra.reporting.records import (
    RECORD_FILENAME,
    RecordBuffer,
    RecordWriter,
    read_records,
    record_to_json,
    set_aside_records_after,
)
from gradspectra.reporting.tags import TAG_ROOT, custom_scalars_layout, layer_tag
from gradspectra.reporting.tensorboard import (
    LayerRuns,
    SummaryWriterLike,
    TensorBoardViews,
    ViewLayer,
    flagged_table,
    heatmap_figure,
    instability_lines,
    layer_profile_figure,
)

__all__ = [
    "RECORD_FILENAME",
    "TAG_ROOT",
    "LayerRuns",
    "RecordBuffer",
    "RecordWriter",
    "SummaryWriterLike",
    "TensorBoardViews",
    "ViewLayer",
    "custom_scalars_layout",
    "flagged_table",
    "heatmap_figure",
    "instability_lines",
    "layer_profile_figure",
    "layer_tag",
    "read_records",
    "record_to_json",
    "set_aside_records_after",
]

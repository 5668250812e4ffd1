//! Tests of the `asr` model.

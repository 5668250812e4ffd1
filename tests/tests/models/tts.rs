//! Tests of the `tts` model.

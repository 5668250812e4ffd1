//! Tests of the `vad` model.

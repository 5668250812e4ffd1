//! Tests of the `speaker` model.

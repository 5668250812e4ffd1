//! Tests of the `manifest` model.

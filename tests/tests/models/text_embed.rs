//! Tests of the `text_embed` model.

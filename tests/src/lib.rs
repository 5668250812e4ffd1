//! Shared fixtures for the end-to-end tests: real speech clips and their transcripts, word error rate.

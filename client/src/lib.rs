//! Parley client library: streams audio to a Parley server and collects the reply (grows with the streaming issue).

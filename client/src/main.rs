//! `parley`: the command-line client.
fn main() -> anyhow::Result<()> {
    anyhow::bail!("the `parley` client arrives with the streaming issue (#3)")
}

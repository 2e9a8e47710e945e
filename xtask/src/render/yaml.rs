//! A YAML document as a tree of maps, lists and raw scalars (with line numbers), read with yaml-rust2.
//!
//! Scalars stay raw text so that the Butane translator can resolve them the way Go's yaml.v3 does
//! for the Go field they land in (for example `mode: 0755` is octal, as `strconv.ParseInt(s, 0, 64)`).

use anyhow::{anyhow, bail, Result};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A node of the document.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// A mapping, in document order.
    Map(Vec<(String, Node)>, usize),
    /// A sequence.
    Seq(Vec<Node>, usize),
    /// A scalar: its text, whether it was plain (unquoted, not a block), and its line.
    Scalar(String, bool, usize),
}

impl Node {
    /// The 1-based line the node starts on.
    pub fn line(&self) -> usize {
        match self {
            Node::Map(_, l) | Node::Seq(_, l) | Node::Scalar(_, _, l) => *l,
        }
    }

    /// A short name of the node's kind, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Node::Map(..) => "a mapping",
            Node::Seq(..) => "a list",
            Node::Scalar(..) => "a scalar",
        }
    }
}

/// Collects parser events into a [`Node`] tree.
#[derive(Default)]
struct Builder {
    stack: Vec<Partial>,
    done: Option<Node>,
    error: Option<String>,
}

enum Partial {
    Map(Vec<(String, Node)>, Option<String>, usize),
    Seq(Vec<Node>, usize),
}

impl Builder {
    fn push_value(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => self.done = Some(node),
            Some(Partial::Seq(items, _)) => items.push(node),
            Some(Partial::Map(entries, key, _)) => match key.take() {
                None => match node {
                    Node::Scalar(text, _, line) => {
                        if entries.iter().any(|(k, _)| *k == text) {
                            self.error.get_or_insert(format!("line {line}: duplicate key `{text}`"));
                        }
                        *key = Some(text);
                    }
                    other => {
                        self.error
                            .get_or_insert(format!("line {}: mapping keys must be scalars", other.line()));
                        *key = Some(String::new());
                    }
                },
                Some(k) => entries.push((k, node)),
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let line = mark.line();
        match ev {
            Event::Scalar(text, style, anchor, tag) => {
                if anchor != 0 || tag.is_some() {
                    self.error.get_or_insert(format!("line {line}: anchors and tags are not supported"));
                }
                self.push_value(Node::Scalar(text, style == TScalarStyle::Plain, line));
            }
            Event::SequenceStart(anchor, tag) => {
                if anchor != 0 || tag.is_some() {
                    self.error.get_or_insert(format!("line {line}: anchors and tags are not supported"));
                }
                self.stack.push(Partial::Seq(Vec::new(), line));
            }
            Event::MappingStart(anchor, tag) => {
                if anchor != 0 || tag.is_some() {
                    self.error.get_or_insert(format!("line {line}: anchors and tags are not supported"));
                }
                self.stack.push(Partial::Map(Vec::new(), None, line));
            }
            Event::SequenceEnd => {
                if let Some(Partial::Seq(items, l)) = self.stack.pop() {
                    self.push_value(Node::Seq(items, l));
                }
            }
            Event::MappingEnd => {
                if let Some(Partial::Map(entries, _, l)) = self.stack.pop() {
                    self.push_value(Node::Map(entries, l));
                }
            }
            Event::Alias(_) => {
                self.error.get_or_insert(format!("line {line}: aliases are not supported"));
            }
            Event::DocumentStart => {
                if self.done.is_some() {
                    self.error.get_or_insert(format!("line {line}: only one YAML document is allowed"));
                }
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
    }
}

/// Parses one YAML document.
pub fn parse(text: &str) -> Result<Node> {
    let mut builder = Builder::default();
    Parser::new_from_str(text).load(&mut builder, true).map_err(|e| anyhow!("YAML syntax error: {e}"))?;
    if let Some(err) = builder.error {
        bail!("{err}");
    }
    builder.done.ok_or_else(|| anyhow!("the YAML document is empty"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_scalars_raw_with_style_and_line() {
        let doc = parse("a: 0755\nb: '0755'\nc:\n  - x\n  - |\n    line\n").unwrap();
        let Node::Map(entries, _) = doc else { panic!("not a map") };
        assert_eq!(entries[0], ("a".into(), Node::Scalar("0755".into(), true, 1)));
        assert_eq!(entries[1], ("b".into(), Node::Scalar("0755".into(), false, 2)));
        let Node::Seq(items, _) = &entries[2].1 else { panic!("not a seq") };
        assert_eq!(items[0], Node::Scalar("x".into(), true, 4));
        assert!(matches!(&items[1], Node::Scalar(text, false, _) if text == "line\n"));
    }

    #[test]
    fn rejects_duplicate_keys_and_aliases() {
        assert!(parse("a: 1\na: 2\n").unwrap_err().to_string().contains("duplicate key `a`"));
        assert!(parse("a: &x 1\nb: *x\n").is_err());
    }
}

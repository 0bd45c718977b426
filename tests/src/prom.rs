//! A strict parser of the Prometheus text exposition format (0.0.4), for checking what the
//! agent's `/metrics` serves: every line must parse, every sample must belong to the family its
//! `# TYPE` declared (declared once, before its samples, which come together), no series twice,
//! and every histogram must be cumulative with `+Inf` equal to `_count`.

use std::collections::{BTreeMap, HashSet};

#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Clone, Debug, Default)]
pub struct Family {
    /// counter, gauge, histogram, summary or untyped.
    pub kind: String,
    pub help: Option<String>,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Default)]
pub struct Exposition {
    pub families: BTreeMap<String, Family>,
}

fn valid_name(name: &str, colon: bool) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'))
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
}

fn parse_value(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => text
            .parse::<f64>()
            .map_err(|_| format!("invalid value {text:?}")),
    }
}

/// `{a="x",b="y"}` at the start of `rest`: the labels and what follows the closing brace.
fn parse_labels(rest: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut s = rest.strip_prefix('{').ok_or("labels must start with {")?;
    loop {
        s = s.trim_start();
        if let Some(after) = s.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = s.find('=').ok_or("label without =")?;
        let name = s[..eq].trim();
        if !valid_name(name, false) {
            return Err(format!("invalid label name {name:?}"));
        }
        s = s[eq + 1..]
            .trim_start()
            .strip_prefix('"')
            .ok_or("label value must be quoted")?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("invalid escape in label value: {other:?}")),
                },
                Some((_, '\n')) | None => return Err("unterminated label value".into()),
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(name.to_owned(), value).is_some() {
            return Err(format!("label {name:?} given twice"));
        }
        s = s[end + 1..].trim_start();
        if let Some(after) = s.strip_prefix(',') {
            s = after;
        } else if !s.starts_with('}') {
            return Err("expected , or } after a label".into());
        }
    }
}

/// The family a sample name belongs to, given the declared families.
fn family_of<'a>(name: &str, declared: &'a BTreeMap<String, Family>) -> Option<&'a str> {
    if let Some((f, _)) = declared.get_key_value(name) {
        if f != name || !matches!(declared[f].kind.as_str(), "histogram" | "summary") {
            return Some(f);
        }
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if let Some((f, fam)) = declared.get_key_value(base) {
                if fam.kind == "histogram" || (fam.kind == "summary" && suffix != "_bucket") {
                    return Some(f);
                }
            }
        }
    }
    None
}

pub fn parse(text: &str) -> Result<Exposition, String> {
    let mut out = Exposition::default();
    let mut current: Option<String> = None;
    let mut finished: HashSet<String> = HashSet::new();
    let mut series: HashSet<(String, BTreeMap<String, String>)> = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            let (kw, name, rest) = (words.next(), words.next(), words.next());
            match (kw, name) {
                (Some("TYPE"), Some(name)) => {
                    let kind = rest.unwrap_or("").trim();
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(at(format!("unknown type {kind:?}")));
                    }
                    if !valid_name(name, true) {
                        return Err(at("invalid metric name".into()));
                    }
                    let fam = out.families.entry(name.to_owned()).or_default();
                    if !fam.kind.is_empty() || !fam.samples.is_empty() {
                        return Err(at("TYPE after the family's samples, or twice".into()));
                    }
                    fam.kind = kind.to_owned();
                }
                (Some("HELP"), Some(name)) => {
                    let fam = out.families.entry(name.to_owned()).or_default();
                    if fam.help.is_some() {
                        return Err(at("HELP twice".into()));
                    }
                    fam.help = Some(rest.unwrap_or("").to_owned());
                }
                _ => {} // another comment
            }
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| at("a sample needs a value".into()))?;
        let name = &line[..name_end];
        if !valid_name(name, true) {
            return Err(at("invalid metric name".into()));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(at)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let mut fields = rest.split_whitespace();
        let value = parse_value(fields.next().ok_or_else(|| at("no value".into()))?).map_err(at)?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .map_err(|_| at(format!("invalid timestamp {ts:?}")))?;
        }
        if fields.next().is_some() {
            return Err(at("trailing text".into()));
        }
        let family = family_of(name, &out.families)
            .ok_or_else(|| at("sample of no declared family (no # TYPE before it)".into()))?
            .to_owned();
        if out.families[&family].kind.is_empty() {
            return Err(at("family has HELP but no TYPE".into()));
        }
        if current.as_deref() != Some(family.as_str()) {
            if finished.contains(&family) {
                return Err(at("the family's samples are not together".into()));
            }
            if let Some(prev) = current.replace(family.clone()) {
                finished.insert(prev);
            }
        }
        if out.families[&family].kind == "histogram"
            && name.ends_with("_bucket")
            && !labels.contains_key("le")
        {
            return Err(at("histogram bucket without le".into()));
        }
        if !series.insert((name.to_owned(), labels.clone())) {
            return Err(at("the same series twice".into()));
        }
        out.families
            .get_mut(&family)
            .expect("declared")
            .samples
            .push(Sample {
                name: name.to_owned(),
                labels,
                value,
            });
    }
    for (name, fam) in &out.families {
        if fam.kind == "histogram" {
            check_histogram(name, fam)?;
        }
    }
    Ok(out)
}

fn check_histogram(name: &str, fam: &Family) -> Result<(), String> {
    let mut buckets: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
    let mut counts = BTreeMap::new();
    for s in &fam.samples {
        let mut key = s.labels.clone();
        if s.name.ends_with("_bucket") {
            let le = parse_value(&key.remove("le").expect("checked"))?;
            buckets.entry(key).or_default().push((le, s.value));
        } else if s.name.ends_with("_count") {
            counts.insert(key, s.value);
        }
    }
    for (labels, mut b) in buckets {
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
        if b.windows(2).any(|w| w[1].1 < w[0].1) {
            return Err(format!(
                "{name}{labels:?}: buckets are not cumulative: {b:?}"
            ));
        }
        let inf = b.last().filter(|(le, _)| le.is_infinite()).map(|(_, v)| *v);
        if inf.is_none() || inf != counts.get(&labels).copied() {
            return Err(format!(
                "{name}{labels:?}: +Inf bucket {inf:?} is not _count {:?}",
                counts.get(&labels)
            ));
        }
    }
    Ok(())
}

impl Exposition {
    /// The samples named `name` whose labels include all of `labels`.
    pub fn samples<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.families
            .values()
            .flat_map(|f| &f.samples)
            .filter(move |s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
    }

    /// The one sample named `name` whose labels include all of `labels`; panics if there is
    /// none or more than one.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<_> = self.samples(name, labels).collect();
        match found.as_slice() {
            [one] => one.value,
            [] => panic!("no sample {name}{labels:?}"),
            many => panic!("{} samples {name}{labels:?}: {many:?}", many.len()),
        }
    }
}

//! The counters of a re-identification risk window (streamproc/privacy/risk.py), for keys
//! that are bytes: what the worker measures (each output's quasi-identifier encodings,
//! concatenated, and the sensitive field's encoding).
//!
//! Why: kept in Python, the counters cost about 1 us per record with the window full
//! (every record added evicts one), more than the whole budget of risk measurement.  Here
//! each record is a few hash-map steps.  The window itself (which records are held, their
//! times, expiry, the cap, rollbacks) stays in Python: it hands this the keys that enter and
//! leave, and reads the counters back for its report.  The Python counters are the oracle
//! (tests/unit/test_privacy_risk.py runs both, and a recount from scratch, on random
//! workloads).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};
use std::collections::HashMap;

use crate::{Fail, NativePlan, Node, Walk};

#[pyclass(module = "streamproc._native")]
pub struct RiskCounts {
    k: u64,
    /// 0: no sensitive attribute (no l-diversity).
    l: u64,
    /// class key -> (records, distinct sensitive values)
    classes: HashMap<Vec<u8>, (u64, u64)>,
    /// length of the class key (u32 LE) ++ class key ++ sensitive key -> records
    pairs: HashMap<Vec<u8>, u64>,
    /// class size -> classes of that size
    sizes: HashMap<u64, u64>,
    /// distinct sensitive values -> classes with that many
    diversity: HashMap<u64, u64>,
    below_k: i64,
    below_l: i64,
    pair: Vec<u8>,
}

fn bump(h: &mut HashMap<u64, u64>, key: u64, up: bool) {
    if up {
        *h.entry(key).or_insert(0) += 1;
    } else if let Some(v) = h.get_mut(&key) {
        *v -= 1;
        if *v == 0 {
            h.remove(&key);
        }
    }
}

impl RiskCounts {
    /// One record of class ``q`` (sensitive ``s``) in (``up``) or out; returns the class size.
    fn step(&mut self, q: &[u8], s: &[u8], up: bool) -> PyResult<u64> {
        let (c, dd) = self.classes.get(q).copied().unwrap_or((0, 0));
        if !up && c == 0 {
            return Err(PyValueError::new_err("a record leaves a class the window does not hold"));
        }
        let n = if up { c + 1 } else { c - 1 };
        let mut dn = dd;
        if self.l > 0 {
            self.pair.clear();
            self.pair.extend_from_slice(&(q.len() as u32).to_le_bytes());
            self.pair.extend_from_slice(q);
            self.pair.extend_from_slice(s);
            let pc = self.pairs.get(self.pair.as_slice()).copied().unwrap_or(0);
            if !up && pc == 0 {
                return Err(PyValueError::new_err("a record leaves a pair the window does not hold"));
            }
            let pn = if up { pc + 1 } else { pc - 1 };
            if pn == 0 {
                self.pairs.remove(self.pair.as_slice());
                dn -= 1;
            } else if pc == 0 {
                self.pairs.insert(self.pair.clone(), pn);
                dn += 1;
            } else if let Some(v) = self.pairs.get_mut(self.pair.as_slice()) {
                *v = pn;
            }
        }
        if n == 0 {
            self.classes.remove(q);
        } else if let Some(v) = self.classes.get_mut(q) {
            *v = (n, dn);
        } else {
            self.classes.insert(q.to_vec(), (n, dn));
        }
        if c > 0 {
            bump(&mut self.sizes, c, false);
        }
        if n > 0 {
            bump(&mut self.sizes, n, true);
        }
        let k = self.k;
        self.below_k += (if n < k { n as i64 } else { 0 }) - (if c < k { c as i64 } else { 0 });
        if self.l > 0 {
            if c > 0 {
                bump(&mut self.diversity, dd, false);
            }
            if n > 0 {
                bump(&mut self.diversity, dn, true);
            }
            let l = self.l;
            self.below_l += (if dn < l { n as i64 } else { 0 }) - (if dd < l { c as i64 } else { 0 });
        }
        Ok(n)
    }

    fn run(&mut self, qs: &Bound<'_, PyList>, ss: Option<&Bound<'_, PyList>>, up: bool) -> PyResult<()> {
        if self.l > 0 && !matches!(ss, Some(s) if s.len() == qs.len()) {
            return Err(PyValueError::new_err("one sensitive key per record"));
        }
        for (i, q) in qs.iter().enumerate() {
            let q = q.downcast::<PyBytes>()?;
            if self.l > 0 {
                let s = ss.expect("checked above").get_item(i)?;
                let s = s.downcast::<PyBytes>()?;
                self.step(q.as_bytes(), s.as_bytes(), up)?;
            } else {
                self.step(q.as_bytes(), &[], up)?;
            }
        }
        Ok(())
    }
}

#[pymethods]
impl RiskCounts {
    /// ``RiskCounts(k, l)``; ``l`` 0 without a sensitive attribute.
    #[new]
    fn new(k: u64, l: u64) -> Self {
        RiskCounts {
            k,
            l,
            classes: HashMap::new(),
            pairs: HashMap::new(),
            sizes: HashMap::new(),
            diversity: HashMap::new(),
            below_k: 0,
            below_l: 0,
            pair: Vec::new(),
        }
    }

    /// Records enter (``add_*``), then records leave (``rem_*``: each one held before).
    #[pyo3(signature = (add_q, add_s, rem_q, rem_s))]
    fn apply(
        &mut self,
        add_q: &Bound<'_, PyList>,
        add_s: Option<&Bound<'_, PyList>>,
        rem_q: &Bound<'_, PyList>,
        rem_s: Option<&Bound<'_, PyList>>,
    ) -> PyResult<()> {
        self.run(add_q, add_s, true)?;
        self.run(rem_q, rem_s, false)
    }

    /// One record in (``up``) or out; returns its class size afterwards.
    #[pyo3(signature = (q, s, up))]
    fn step1(&mut self, q: &Bound<'_, PyBytes>, s: Option<&Bound<'_, PyBytes>>, up: bool) -> PyResult<u64> {
        let s = s.map(|s| s.as_bytes()).unwrap_or(&[]);
        self.step(q.as_bytes(), s, up)
    }

    fn class_size(&self, q: &Bound<'_, PyBytes>) -> u64 {
        self.classes.get(q.as_bytes()).map_or(0, |v| v.0)
    }

    /// ``(classes, smallest class, records below k, unique classes, smallest l, records below l)``.
    fn counters(&self) -> (usize, u64, i64, u64, u64, i64) {
        (
            self.classes.len(),
            self.sizes.keys().copied().min().unwrap_or(0),
            self.below_k,
            self.sizes.get(&1).copied().unwrap_or(0),
            self.diversity.keys().copied().min().unwrap_or(0),
            self.below_l,
        )
    }
}

/// Reads the keys risk measurement compares from a batch of output plaintexts, in one walk
/// per record: the encodings of the quasi-identifier fields, concatenated (the class key),
/// and of the sensitive field (the sensitive key).
///
/// Why: reading them back with two keep/drop plans costs two calls and two walks per
/// record; this walks each record once and builds the two lists here.  The walk is the
/// plan interpreter's `skip` over a keep/drop plan of the output schema (built by
/// streamproc/pipeline/native.py), so the structure checks are the same: a record that
/// does not match its schema raises `BadPayload`, and it must end where the schema ends.
#[pyclass(frozen, module = "streamproc._native")]
pub struct KeyReader {
    plan: Py<NativePlan>,
    /// per top-level field: bit 1 class key, bit 2 sensitive key (0: skipped)
    slots: Vec<u8>,
    sensitive: bool,
}

#[pymethods]
impl KeyReader {
    /// ``KeyReader(plan, slots)``: ``plan`` a keep/drop plan over the output record, one
    /// slot per top-level field.
    #[new]
    fn new(plan: Py<NativePlan>, slots: Vec<u8>) -> PyResult<Self> {
        match &plan.get().root {
            Node::Record(children)
                if children.len() == slots.len()
                    && children.iter().all(|c| matches!(c, Node::Keep(_) | Node::Drop(_))) => {}
            _ => return Err(PyValueError::new_err("a key reader needs a keep/drop plan with one slot per field")),
        }
        let sensitive = slots.iter().any(|s| s & 2 != 0);
        Ok(KeyReader { plan, slots, sensitive })
    }

    /// ``(class keys, sensitive keys)`` of ``plains``, in order (the second list empty
    /// without a sensitive field).
    fn read<'py>(
        &self,
        py: Python<'py>,
        plains: &Bound<'py, PyList>,
    ) -> PyResult<(Bound<'py, PyList>, Bound<'py, PyList>)> {
        let plan = self.plan.get();
        let children = match &plan.root {
            Node::Record(children) => children,
            _ => unreachable!("checked at construction"),
        };
        let qs = PyList::empty(py);
        let ss = PyList::empty(py);
        let mut q: Vec<u8> = Vec::new();
        let mut s: Vec<u8> = Vec::new();
        for item in plains.iter() {
            let b = item.downcast::<PyBytes>()?;
            let buf = b.as_bytes();
            let mut w = Walk { py, plan, buf, pos: plan.offset, start: plan.offset, out: Vec::new() };
            q.clear();
            s.clear();
            for (child, slot) in children.iter().zip(&self.slots) {
                let t = match child {
                    Node::Keep(t) | Node::Drop(t) => t,
                    _ => unreachable!("checked at construction"),
                };
                let a = w.pos;
                w.skip(t).map_err(|f| plan.fail(py, f))?;
                if slot & 1 != 0 {
                    q.extend_from_slice(w.slice(a, w.pos));
                }
                if slot & 2 != 0 {
                    s.extend_from_slice(w.slice(a, w.pos));
                }
            }
            if w.pos != buf.len() {
                return Err(plan.fail(py, Fail::Bad("trailing or missing bytes")));
            }
            qs.append(PyBytes::new(py, &q))?;
            if self.sensitive {
                ss.append(PyBytes::new(py, &s))?;
            }
        }
        Ok((qs, ss))
    }
}

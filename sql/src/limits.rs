//! Bounds on what one query may take: its size and nesting, its memory, and the size of
//! any one value it computes.
//!
//! What flows through here: the parsed statement, before planning ([`check_statement`]:
//! SQL text size, expression nesting depth, number of expression nodes, depth of set
//! operations and subqueries, so that nothing the parser accepts overflows a stack later);
//! every memory reservation DataFusion's operators make ([`QueryPool`], one per query, over
//! a [`QueryMemory`] shared by all queries); and the arguments and results of the scalar
//! functions whose output size is set by an argument's value (`repeat`, `lpad`, `range`,
//! ...) or can double per nesting level (`concat`, `||`): [`install_guards`] wraps them so
//! that a call whose result would exceed the query's memory limit is refused before it
//! runs, and any result beyond it is refused after. DataFusion's memory pool sees
//! operators (sorts, joins, aggregates), not expression values: without these guards
//! `SELECT cardinality(range(100000000000))` grows without bound inside one call.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, FieldRef, Int64Type};
use datafusion::common::{DFSchema, DataFusionError, ExprSchema, Result, ScalarValue};
use datafusion::execution::memory_pool::{
    MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::planner::{ExprPlanner, PlannerResult, RawBinaryExpr};
use datafusion::logical_expr::simplify::{ExprSimplifyResult, SimplifyContext};
use datafusion::logical_expr::sort_properties::{ExprProperties, SortProperties};
use datafusion::logical_expr::udf_eq::UdfEq;
use datafusion::logical_expr::{
    BinaryExpr, ColumnarValue, Documentation, Expr, ExprSchemable, Operator, ReturnFieldArgs,
    ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{
    self as sql, BinaryOperator, Query, SetExpr, Visit, Visitor,
};

use crate::query::QueryError;

/// What one query may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryLimits {
    /// Longest SQL text accepted, in bytes.
    pub max_sql_bytes: usize,
    /// Deepest nesting of expressions, subqueries and set operations (`UNION`) accepted.
    pub max_depth: usize,
    /// Most expression nodes in one statement.
    pub max_nodes: usize,
    /// Most memory one query's operators may reserve, and the largest value (one
    /// function result) it may compute.
    pub memory_per_query: usize,
    /// Most memory all running queries may reserve together.
    pub memory_total: usize,
    /// Most bytes of spill files on local disk, all queries together.
    pub max_spill: u64,
}

impl Default for QueryLimits {
    fn default() -> Self {
        Self {
            max_sql_bytes: 256 * 1024,
            max_depth: 128,
            max_nodes: 100_000,
            memory_per_query: 256 << 20,
            memory_total: 512 << 20,
            max_spill: 1 << 30,
        }
    }
}

fn too_big(what: String) -> QueryError {
    QueryError::InvalidArgument(what)
}

/// Most function calls nested in one another that the SQL text may hold. The SQL parser
/// tries some function names (`length`, `coalesce`, ...) as another construct first and
/// parses their arguments again when that fails, so each level doubles the parse time:
/// 16 levels of `length(` took a second, 30 would take hours, all inside one synchronous
/// call that no deadline can stop. Real queries nest a handful.
pub const MAX_FUNCTION_NESTING: usize = 12;

/// Refuses SQL longer than `max_sql_bytes`, or nesting function calls deeper than
/// [`MAX_FUNCTION_NESTING`], before it is parsed.
pub fn check_text(sql: &str, limits: &QueryLimits) -> Result<(), QueryError> {
    if sql.len() > limits.max_sql_bytes {
        return Err(too_big(format!(
            "the query is {} bytes long, more than the {} accepted (query.max_sql_bytes)",
            sql.len(),
            limits.max_sql_bytes
        )));
    }
    let deepest = function_nesting(sql);
    if deepest > MAX_FUNCTION_NESTING {
        return Err(too_big(format!(
            "the query nests function calls {deepest} deep; at most {MAX_FUNCTION_NESTING} \
             are accepted (each level doubles the time the SQL parser takes)"
        )));
    }
    Ok(())
}

/// Keywords a parenthesis follows without being a call.
const NOT_CALLS: &[&str] = &[
    "SELECT",
    "WHERE",
    "AND",
    "OR",
    "NOT",
    "IN",
    "ON",
    "FROM",
    "AS",
    "THEN",
    "ELSE",
    "WHEN",
    "BY",
    "HAVING",
    "JOIN",
    "VALUES",
    "USING",
    "OVER",
    "WITH",
    "UNION",
    "ALL",
    "EXCEPT",
    "INTERSECT",
    "LATERAL",
    "IS",
    "CASE",
    "DISTINCT",
    "RETURN",
    "EXISTS",
];

/// The identifier right before the end of `text` (white space skipped), or empty.
fn last_word(text: &[u8]) -> &[u8] {
    let end = text
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(0, |p| p + 1);
    let start = text[..end]
        .iter()
        .rposition(|c| !(c.is_ascii_alphanumeric() || *c == b'_'))
        .map_or(0, |p| p + 1);
    &text[start..end]
}

/// The deepest nesting of function calls in `sql`: parentheses that follow a word,
/// counted outside string literals, quoted identifiers and comments. A scan of the text,
/// without recursion.
fn function_nesting(sql: &str) -> usize {
    let bytes = sql.as_bytes();
    // For each open parenthesis: whether it opened a function call.
    let mut open: Vec<bool> = Vec::new();
    let (mut calls, mut deepest) = (0usize, 0usize);
    let mut i = 0;
    // The last byte that was not white space, outside literals and comments.
    let mut last: u8 = b' ';
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'\'' | b'"' | b'`' => {
                // Skip to the closing quote (a doubled quote stays inside).
                i += 1;
                while i < bytes.len() {
                    if bytes[i] == c {
                        if bytes.get(i + 1) == Some(&c) {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                last = c;
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < bytes.len() && !(bytes[i] == b'*' && bytes[i + 1] == b'/') {
                    i += 1;
                }
                i += 1;
            }
            b'(' => {
                let word = last_word(&bytes[..i]);
                let call = (last.is_ascii_alphanumeric() || matches!(last, b'_' | b'"' | b'`'))
                    && !NOT_CALLS
                        .iter()
                        .any(|k| k.as_bytes().eq_ignore_ascii_case(word));
                open.push(call);
                if call {
                    calls += 1;
                    deepest = deepest.max(calls);
                }
                last = c;
            }
            b')' => {
                if open.pop() == Some(true) {
                    calls -= 1;
                }
                last = c;
            }
            c if c.is_ascii_whitespace() => {}
            _ => last = c,
        }
        i += 1;
    }
    deepest
}

/// Measures nesting while the statement is walked; stops the walk at the first limit.
struct Depth<'a> {
    limits: &'a QueryLimits,
    depth: usize,
    nodes: usize,
    /// Levels each query being walked entered.
    queries: Vec<usize>,
}

impl Visitor for Depth<'_> {
    type Break = QueryError;

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<QueryError> {
        // Set operations nest left-deep (`a UNION b UNION c ...`), outside what the
        // expression hooks see; measured here without recursion, and counted with the
        // query's own level.
        let levels = set_depth(&query.body, self.limits.max_depth + 1);
        self.queries.push(levels);
        self.enter(levels)
    }

    fn post_visit_query(&mut self, _query: &Query) -> ControlFlow<QueryError> {
        let levels = self.queries.pop().unwrap_or(0);
        self.exit(levels);
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, _expr: &sql::Expr) -> ControlFlow<QueryError> {
        self.nodes += 1;
        if self.nodes > self.limits.max_nodes {
            return ControlFlow::Break(too_big(format!(
                "the query has more than {} expression nodes (query.max_nodes)",
                self.limits.max_nodes
            )));
        }
        self.enter(1)
    }

    fn post_visit_expr(&mut self, _expr: &sql::Expr) -> ControlFlow<QueryError> {
        self.exit(1);
        ControlFlow::Continue(())
    }
}

impl Depth<'_> {
    fn enter(&mut self, n: usize) -> ControlFlow<QueryError> {
        self.depth += n;
        if self.depth > self.limits.max_depth {
            return ControlFlow::Break(too_big(format!(
                "the query nests expressions, subqueries or set operations more than {} deep \
                 (query.max_depth); a long chain like a + b + c ... or x UNION y UNION z ... \
                 nests one level per term",
                self.limits.max_depth
            )));
        }
        ControlFlow::Continue(())
    }

    fn exit(&mut self, n: usize) {
        self.depth -= n;
    }
}

/// Nesting depth of set operations under `body`, counted up to `cap` (the walk goes no
/// deeper, so it cannot overflow a stack however deep the chain is).
fn set_depth(body: &SetExpr, cap: usize) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(body, 1usize)];
    while let Some((e, d)) = stack.pop() {
        deepest = deepest.max(d);
        if d >= cap {
            break;
        }
        if let SetExpr::SetOperation { left, right, .. } = e {
            stack.push((left, d + 1));
            stack.push((right, d + 1));
        }
    }
    deepest
}

/// Refuses a statement nested deeper than `max_depth` or with more than `max_nodes`
/// expression nodes. The walk stops at the first limit, so its own recursion is bounded
/// by `max_depth`.
pub fn check_statement(statement: &DFStatement, limits: &QueryLimits) -> Result<(), QueryError> {
    let mut v = Depth {
        limits,
        depth: 0,
        nodes: 0,
        queries: Vec::new(),
    };
    let flow = match statement {
        DFStatement::Statement(s) => s.visit(&mut v),
        DFStatement::Explain(e) => match e.statement.as_ref() {
            DFStatement::Statement(s) => s.visit(&mut v),
            _ => ControlFlow::Continue(()),
        },
        _ => ControlFlow::Continue(()),
    };
    match flow {
        ControlFlow::Break(e) => Err(e),
        ControlFlow::Continue(()) => Ok(()),
    }
}

/// Memory all running queries share (`query.total_memory`).
#[derive(Debug)]
pub struct QueryMemory {
    used: AtomicUsize,
    limit: usize,
}

impl QueryMemory {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            limit,
        })
    }

    /// Bytes reserved by running queries now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// One query's memory pool: reservations count against its own limit and the shared
/// one; a sort or an aggregate that cannot grow spills (where it can) or ends the query
/// with a message naming the limit.
#[derive(Debug)]
pub struct QueryPool {
    shared: Arc<QueryMemory>,
    used: AtomicUsize,
    limit: usize,
}

impl QueryPool {
    pub fn new(shared: Arc<QueryMemory>, limit: usize) -> Self {
        Self {
            shared,
            used: AtomicUsize::new(0),
            limit,
        }
    }
}

impl Drop for QueryPool {
    fn drop(&mut self) {
        // Whatever the query still held goes back to the others.
        let left = self.used.swap(0, Ordering::Relaxed);
        self.shared.used.fetch_sub(left, Ordering::Relaxed);
    }
}

fn mib(b: usize) -> usize {
    b.div_ceil(1 << 20)
}

impl std::fmt::Display for QueryPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "query pool: {} of {} bytes reserved",
            self.used.load(Ordering::Relaxed),
            self.limit
        )
    }
}

impl MemoryPool for QueryPool {
    fn name(&self) -> &str {
        "sluice-query"
    }

    fn grow(&self, _reservation: &MemoryReservation, additional: usize) {
        self.used.fetch_add(additional, Ordering::Relaxed);
        self.shared.used.fetch_add(additional, Ordering::Relaxed);
    }

    fn shrink(&self, _reservation: &MemoryReservation, shrink: usize) {
        self.used.fetch_sub(shrink, Ordering::Relaxed);
        self.shared.used.fetch_sub(shrink, Ordering::Relaxed);
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> Result<()> {
        let mine = self.used.fetch_add(additional, Ordering::Relaxed) + additional;
        if mine > self.limit {
            self.used.fetch_sub(additional, Ordering::Relaxed);
            return Err(DataFusionError::ResourcesExhausted(format!(
                "the query exceeded its memory limit of {} MiB (query.memory_limit) in {}",
                mib(self.limit),
                reservation.consumer().name()
            )));
        }
        let all = self.shared.used.fetch_add(additional, Ordering::Relaxed) + additional;
        if all > self.shared.limit {
            self.shared.used.fetch_sub(additional, Ordering::Relaxed);
            self.used.fetch_sub(additional, Ordering::Relaxed);
            return Err(DataFusionError::ResourcesExhausted(format!(
                "the queries running now together exceed their memory limit of {} MiB \
                 (query.total_memory) in {}; try again when fewer run",
                mib(self.shared.limit),
                reservation.consumer().name()
            )));
        }
        Ok(())
    }

    fn reserved(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn memory_limit(&self) -> MemoryLimit {
        MemoryLimit::Finite(self.limit)
    }

    fn register(&self, _consumer: &MemoryConsumer) {}
}

/// How a guarded function's result size is estimated from its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Growth {
    /// At most the sum of its arguments (`concat`, `array_append`, ...).
    Sum,
    /// `repeat(s, n)`: |s| × n.
    Repeat,
    /// `lpad(s, n [, fill])`, `rpad`: up to 4 bytes per character × n.
    Pad,
    /// `replace(s, from, to)`: |s| × (1 + |to|) when `from` is empty.
    Replace,
    /// `regexp_replace(s, pattern, replacement)`: each match (up to |s| + 1 of them)
    /// replaced by the replacement, whose back-references copy the match.
    RegexpReplace,
    /// `range(stop)`, `range(start, stop [, step])`, `generate_series`: one element per
    /// step.
    Series,
    /// `array_repeat(element, n)`: n copies.
    ArrayRepeat,
    /// `array_resize(array, n [, fill])`: n elements.
    ArrayResize,
    /// No estimate before the call; the result is still checked.
    After,
}

/// The functions guarded, and how their result grows.
const GUARDED: &[(&str, Growth)] = &[
    ("repeat", Growth::Repeat),
    ("lpad", Growth::Pad),
    ("rpad", Growth::Pad),
    ("replace", Growth::Replace),
    ("regexp_replace", Growth::RegexpReplace),
    ("range", Growth::Series),
    ("generate_series", Growth::Series),
    ("array_repeat", Growth::ArrayRepeat),
    ("array_resize", Growth::ArrayResize),
    ("concat", Growth::Sum),
    ("concat_ws", Growth::Sum),
    ("overlay", Growth::Sum),
    ("array_concat", Growth::Sum),
    ("array_append", Growth::Sum),
    ("array_prepend", Growth::Sum),
    ("array_union", Growth::Sum),
    ("make_array", Growth::Sum),
    ("string_to_array", Growth::After),
    ("translate", Growth::After),
    ("to_hex", Growth::After),
    ("encode", Growth::After),
];

/// Name of the function `a || b` on strings is planned as (see [`ConcatPlanner`]).
pub const STRCAT: &str = "sluice_guard_concat_op";

/// Wraps the functions in [`GUARDED`] registered in `ctx`, and plans `a || b` through a
/// guard, so that no value a query computes exceeds `max_bytes`.
pub fn install_guards(ctx: &SessionContext, max_bytes: usize) {
    let state = ctx.state();
    let functions = state.scalar_functions();
    let mut wrapped = std::collections::HashMap::new();
    for (name, growth) in GUARDED {
        if let Some(f) = functions.get(*name) {
            let g = ScalarUDF::new_from_impl(Bounded {
                inner: UdfEq::from(f.inner().clone()),
                growth: *growth,
                max_bytes,
            });
            wrapped.insert(*name, Arc::new(g.clone()));
            ctx.register_udf(g);
        }
    }
    let strcat = Arc::new(ScalarUDF::new_from_impl(GuardOp {
        signature: Signature::any(1, Volatility::Immutable),
        max_bytes,
    }));
    ctx.register_udf(strcat.as_ref().clone());
    // Planned before the others: the built-in planner of `||` on arrays builds its calls
    // with the unguarded functions.
    let mut planners: Vec<Arc<dyn ExprPlanner>> = vec![Arc::new(ConcatPlanner {
        guard: strcat,
        array_concat: wrapped.get("array_concat").cloned(),
        array_append: wrapped.get("array_append").cloned(),
        array_prepend: wrapped.get("array_prepend").cloned(),
    })];
    planners.extend(ctx.state().expr_planners().iter().cloned());
    let state = datafusion::execution::SessionStateBuilder::new_from_existing(ctx.state())
        .with_expr_planners(planners)
        .build();
    *ctx.state_ref().write() = state;
}

/// Bytes an argument takes for `rows` rows (a scalar counts once per row).
fn arg_bytes(arg: &ColumnarValue, rows: usize) -> usize {
    match arg {
        ColumnarValue::Array(a) => array_bytes(a.as_ref()),
        ColumnarValue::Scalar(s) => s.size().saturating_mul(rows.max(1)),
    }
}

fn array_bytes(a: &dyn Array) -> usize {
    a.to_data()
        .get_slice_memory_size()
        .unwrap_or_else(|_| a.get_array_memory_size())
}

/// The argument as an array of `rows` rows (scalars repeated).
fn as_array(arg: &ColumnarValue, rows: usize) -> Result<ArrayRef> {
    arg.to_array(rows.max(1))
}

/// Per row: the argument's value as an i64 (numbers; null and others as 0).
fn ints(arg: &ColumnarValue, rows: usize) -> Result<Vec<i64>> {
    if let ColumnarValue::Scalar(s) = arg {
        let v = s
            .cast_to(&DataType::Int64)
            .ok()
            .and_then(|v| match v {
                ScalarValue::Int64(v) => v,
                _ => None,
            })
            .unwrap_or(0);
        return Ok(vec![v; rows.max(1)]);
    }
    let a = as_array(arg, rows)?;
    let a = match arrow::compute::cast(&a, &DataType::Int64) {
        Ok(a) => a,
        Err(_) => return Ok(vec![0; rows.max(1)]),
    };
    let a = a.as_primitive::<Int64Type>();
    Ok((0..a.len())
        .map(|i| if a.is_valid(i) { a.value(i) } else { 0 })
        .collect())
}

/// Per row: the argument's length in bytes (strings, binaries) or elements (lists).
fn lens(arg: &ColumnarValue, rows: usize) -> Result<Vec<usize>> {
    if let ColumnarValue::Scalar(s) = arg {
        return Ok(vec![s.size(); rows.max(1)]);
    }
    let a = as_array(arg, rows)?;
    let n = a.len().max(1);
    // Spread evenly: exact enough for a bound that multiplies.
    let per = array_bytes(a.as_ref()).div_ceil(n);
    Ok(vec![per; n])
}

impl Growth {
    /// An upper bound of the result's size in bytes, `None` when unknown before the call.
    fn estimate(self, args: &[ColumnarValue], rows: usize) -> Result<Option<u128>> {
        let arg = |i: usize| args.get(i);
        Ok(match self {
            Growth::After => None,
            Growth::Sum => Some(args.iter().map(|a| arg_bytes(a, rows) as u128).sum()),
            Growth::Repeat => match (arg(0), arg(1)) {
                (Some(s), Some(n)) => {
                    let (l, n) = (lens(s, rows)?, ints(n, rows)?);
                    Some(
                        l.iter()
                            .zip(&n)
                            .map(|(l, n)| *l as u128 * (*n).max(0) as u128)
                            .sum(),
                    )
                }
                _ => None,
            },
            Growth::Pad => match arg(1) {
                Some(n) => Some(
                    ints(n, rows)?
                        .iter()
                        .map(|n| (*n).max(0) as u128 * 4)
                        .sum::<u128>()
                        + arg(0).map_or(0, |s| arg_bytes(s, rows) as u128),
                ),
                None => None,
            },
            Growth::Replace | Growth::RegexpReplace => match (arg(0), arg(2)) {
                (Some(s), Some(to)) => {
                    let (l, t) = (lens(s, rows)?, lens(to, rows)?);
                    let per_char = if self == Growth::Replace { 1 } else { 2 };
                    Some(
                        l.iter()
                            .zip(&t)
                            .map(|(l, t)| (*l as u128 + 1) * (1 + per_char * *t as u128))
                            .sum(),
                    )
                }
                _ => None,
            },
            Growth::Series => Some(series_elements(args, rows)?.saturating_mul(8)),
            Growth::ArrayRepeat => match (arg(0), arg(1)) {
                (Some(e), Some(n)) => {
                    let per = (arg_bytes(e, rows) / rows.max(1)) as u128 + 8;
                    Some(
                        ints(n, rows)?
                            .iter()
                            .map(|n| (*n).max(0) as u128 * per)
                            .sum(),
                    )
                }
                _ => None,
            },
            Growth::ArrayResize => match arg(1) {
                Some(n) => Some(
                    ints(n, rows)?
                        .iter()
                        .map(|n| (*n).max(0) as u128 * 16)
                        .sum::<u128>()
                        + arg(0).map_or(0, |a| arg_bytes(a, rows) as u128),
                ),
                None => None,
            },
        })
    }
}

/// Elements `range`/`generate_series` would make: `(stop - start) / step` per row, with
/// dates and timestamps counted in their own units (an interval step in nanoseconds,
/// a month counted as 28 days so the count is never under-estimated).
fn series_elements(args: &[ColumnarValue], rows: usize) -> Result<u128> {
    let as_i64 = |v: &ColumnarValue| -> Result<Vec<i64>> {
        match v.data_type() {
            DataType::Date32 => Ok(ints(v, rows)?
                .iter()
                .map(|d| d.saturating_mul(86_400_000_000_000))
                .collect()),
            DataType::Date64 => Ok(ints(v, rows)?
                .iter()
                .map(|d| d.saturating_mul(1_000_000))
                .collect()),
            DataType::Timestamp(unit, _) => {
                let per = match unit {
                    arrow::datatypes::TimeUnit::Second => 1_000_000_000,
                    arrow::datatypes::TimeUnit::Millisecond => 1_000_000,
                    arrow::datatypes::TimeUnit::Microsecond => 1_000,
                    arrow::datatypes::TimeUnit::Nanosecond => 1,
                };
                Ok(ints(v, rows)?
                    .iter()
                    .map(|t| t.saturating_mul(per))
                    .collect())
            }
            _ => ints(v, rows),
        }
    };
    let step_of = |v: &ColumnarValue| -> Result<Vec<i64>> {
        match v.data_type() {
            DataType::Interval(_) => {
                let a = as_array(v, rows)?;
                let a = arrow::compute::cast(
                    &a,
                    &DataType::Interval(arrow::datatypes::IntervalUnit::MonthDayNano),
                )?;
                let a = a.as_primitive::<arrow::datatypes::IntervalMonthDayNanoType>();
                Ok((0..a.len())
                    .map(|i| {
                        let x = a.value(i);
                        (x.months as i64)
                            .saturating_mul(28 * 86_400_000_000_000)
                            .saturating_add((x.days as i64).saturating_mul(86_400_000_000_000))
                            .saturating_add(x.nanoseconds)
                    })
                    .collect())
            }
            _ => ints(v, rows),
        }
    };
    let (start, stop, step) = match args.len() {
        0 => return Ok(0),
        1 => (
            vec![0; rows.max(1)],
            as_i64(&args[0])?,
            vec![1; rows.max(1)],
        ),
        2 => (as_i64(&args[0])?, as_i64(&args[1])?, vec![1; rows.max(1)]),
        _ => (as_i64(&args[0])?, as_i64(&args[1])?, step_of(&args[2])?),
    };
    // Interval steps are in nanoseconds; integers and dates use their own units.
    Ok(start
        .iter()
        .zip(&stop)
        .zip(&step)
        .map(|((a, b), s)| {
            let span = (*b as i128 - *a as i128).unsigned_abs();
            let step = (*s as i128).unsigned_abs().max(1);
            (span / step) + 1
        })
        .sum())
}

fn result_bytes(v: &ColumnarValue) -> usize {
    match v {
        ColumnarValue::Array(a) => array_bytes(a.as_ref()),
        ColumnarValue::Scalar(s) => s.size(),
    }
}

fn over_limit(name: &str, bytes: u128, max: usize, before: bool) -> DataFusionError {
    DataFusionError::ResourcesExhausted(format!(
        "{name}(): its result {} {} MiB, more than the query memory limit of {} MiB \
         (query.memory_limit)",
        if before { "would take about" } else { "takes" },
        bytes.div_ceil(1 << 20),
        mib(max)
    ))
}

/// A scalar function whose result size is checked against `max_bytes`, before the call
/// (by [`Growth::estimate`]) and after. Everything else is the wrapped function's.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Bounded {
    inner: UdfEq<Arc<dyn ScalarUDFImpl>>,
    growth: Growth,
    max_bytes: usize,
}

#[warn(clippy::missing_trait_methods)]
impl ScalarUDFImpl for Bounded {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn display_name(&self, args: &[Expr]) -> Result<String> {
        #[expect(deprecated)]
        self.inner.display_name(args)
    }

    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        self.inner.schema_name(args)
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn with_updated_config(
        &self,
        _config: &datafusion::common::config::ConfigOptions,
    ) -> Option<ScalarUDF> {
        None
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        self.inner.return_field_from_args(args)
    }

    fn is_nullable(&self, args: &[Expr], schema: &dyn ExprSchema) -> bool {
        #[expect(deprecated)]
        self.inner.is_nullable(args, schema)
    }

    fn is_strict(&self) -> bool {
        self.inner.is_strict()
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let rows = args.number_rows;
        if let Some(bytes) = self.growth.estimate(&args.args, rows)? {
            if bytes > self.max_bytes as u128 {
                return Err(over_limit(self.name(), bytes, self.max_bytes, true));
            }
        }
        let out = self.inner.invoke_with_args(args)?;
        let bytes = result_bytes(&out);
        if bytes > self.max_bytes {
            return Err(over_limit(
                self.name(),
                bytes as u128,
                self.max_bytes,
                false,
            ));
        }
        Ok(out)
    }

    fn simplify(&self, args: Vec<Expr>, info: &SimplifyContext) -> Result<ExprSimplifyResult> {
        self.inner.simplify(args, info)
    }

    fn preimage(
        &self,
        args: &[Expr],
        lit_expr: &Expr,
        info: &SimplifyContext,
    ) -> Result<datafusion::logical_expr::preimage::PreimageResult> {
        self.inner.preimage(args, lit_expr, info)
    }

    fn short_circuits(&self) -> bool {
        self.inner.short_circuits()
    }

    fn conditional_arguments<'a>(
        &self,
        args: &'a [Expr],
    ) -> Option<(Vec<&'a Expr>, Vec<&'a Expr>)> {
        self.inner.conditional_arguments(args)
    }

    fn evaluate_bounds(
        &self,
        input: &[&datafusion::logical_expr::interval_arithmetic::Interval],
    ) -> Result<datafusion::logical_expr::interval_arithmetic::Interval> {
        self.inner.evaluate_bounds(input)
    }

    fn propagate_constraints(
        &self,
        interval: &datafusion::logical_expr::interval_arithmetic::Interval,
        inputs: &[&datafusion::logical_expr::interval_arithmetic::Interval],
    ) -> Result<Option<Vec<datafusion::logical_expr::interval_arithmetic::Interval>>> {
        self.inner.propagate_constraints(interval, inputs)
    }

    fn struct_field_mapping(
        &self,
        literal_args: &[Option<ScalarValue>],
    ) -> Option<datafusion::logical_expr::StructFieldMapping> {
        self.inner.struct_field_mapping(literal_args)
    }

    fn output_ordering(&self, inputs: &[ExprProperties]) -> Result<SortProperties> {
        self.inner.output_ordering(inputs)
    }

    fn preserves_lex_ordering(&self, inputs: &[ExprProperties]) -> Result<bool> {
        self.inner.preserves_lex_ordering(inputs)
    }

    fn strictly_order_preserving(&self, inputs: &[ExprProperties]) -> Result<bool> {
        self.inner.strictly_order_preserving(inputs)
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }

    fn placement(
        &self,
        args: &[datafusion::logical_expr::ExpressionPlacement],
    ) -> datafusion::logical_expr::ExpressionPlacement {
        self.inner.placement(args)
    }
}

/// The identity on its one argument, refusing a value over `max_bytes`: `a || b` on
/// strings is planned as `sluice_guard_concat_op(a || b)`, which keeps the operator's
/// semantics (null if either side is null) and its column name.
#[derive(Debug, PartialEq, Eq, Hash)]
struct GuardOp {
    signature: Signature,
    max_bytes: usize,
}

impl ScalarUDFImpl for GuardOp {
    fn name(&self) -> &str {
        STRCAT
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        Ok(arg_types[0].clone())
    }

    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        Ok(args[0].schema_name().to_string())
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let v = args.args.into_iter().next().expect("one argument");
        let bytes = result_bytes(&v);
        if bytes > self.max_bytes {
            return Err(over_limit("||", bytes as u128, self.max_bytes, false));
        }
        Ok(v)
    }
}

/// Plans `a || b` through guarded functions: strings as the operator inside
/// [`GuardOp`], arrays as the guarded `array_concat`/`array_append`/`array_prepend`.
#[derive(Debug)]
struct ConcatPlanner {
    guard: Arc<ScalarUDF>,
    array_concat: Option<Arc<ScalarUDF>>,
    array_append: Option<Arc<ScalarUDF>>,
    array_prepend: Option<Arc<ScalarUDF>>,
}

fn list_dims(t: &DataType) -> usize {
    match t {
        DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
            1 + list_dims(f.data_type())
        }
        _ => 0,
    }
}

impl ExprPlanner for ConcatPlanner {
    fn plan_binary_op(
        &self,
        expr: RawBinaryExpr,
        schema: &DFSchema,
    ) -> Result<PlannerResult<RawBinaryExpr>> {
        if expr.op != BinaryOperator::StringConcat {
            return Ok(PlannerResult::Original(expr));
        }
        let (l, r) = (
            list_dims(&expr.left.get_type(schema)?),
            list_dims(&expr.right.get_type(schema)?),
        );
        let call = |f: &Option<Arc<ScalarUDF>>, args: Vec<Expr>| {
            f.as_ref()
                .map(|f| Expr::ScalarFunction(ScalarFunction::new_udf(f.clone(), args)))
        };
        let planned = if l + r == 0 {
            Some(Expr::ScalarFunction(ScalarFunction::new_udf(
                self.guard.clone(),
                vec![Expr::BinaryExpr(BinaryExpr::new(
                    Box::new(expr.left.clone()),
                    Operator::StringConcat,
                    Box::new(expr.right.clone()),
                ))],
            )))
        } else if l == r {
            call(
                &self.array_concat,
                vec![expr.left.clone(), expr.right.clone()],
            )
        } else if l > r {
            call(
                &self.array_append,
                vec![expr.left.clone(), expr.right.clone()],
            )
        } else {
            call(
                &self.array_prepend,
                vec![expr.left.clone(), expr.right.clone()],
            )
        };
        Ok(match planned {
            Some(e) => PlannerResult::Planned(e),
            None => PlannerResult::Original(expr),
        })
    }
}

/// Why a query was stopped from outside: its time ran out, or its client went away.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Stopped(pub String);

/// Stops one query: a deadline, and a flag its client's going away sets. Checked by every
/// operator of its plan at every batch ([`GuardExec`]), so a query stops within one
/// batch of work wherever it is; the same check makes each operator give its thread
/// back now and then, so a plan that never waits cannot keep a query thread from
/// noticing.
#[derive(Debug)]
pub struct QueryGuard {
    deadline: Option<(std::time::Instant, String)>,
    /// Why the query was cancelled, once it is.
    cancelled: std::sync::OnceLock<String>,
}

impl QueryGuard {
    /// `timeout`, with the name of its key for the message.
    pub fn new(timeout: Option<(std::time::Duration, &str)>) -> Arc<Self> {
        Arc::new(Self {
            deadline: timeout.map(|(t, key)| {
                (
                    std::time::Instant::now() + t,
                    format!(
                        "the query ran longer than {} and was stopped ({key})",
                        humanize(t)
                    ),
                )
            }),
            cancelled: std::sync::OnceLock::new(),
        })
    }

    /// Stops the query at its next batch, with `why` as its error.
    pub fn cancel(&self, why: &str) {
        let _ = self.cancelled.set(why.to_string());
    }

    fn check(&self) -> Result<()> {
        if let Some(why) = self.cancelled.get() {
            return Err(DataFusionError::External(Box::new(Stopped(why.clone()))));
        }
        if let Some((at, message)) = &self.deadline {
            if std::time::Instant::now() >= *at {
                return Err(DataFusionError::External(Box::new(Stopped(
                    message.clone(),
                ))));
            }
        }
        Ok(())
    }
}

fn humanize(t: std::time::Duration) -> String {
    if t.subsec_millis() == 0 {
        format!("{}s", t.as_secs())
    } else {
        format!("{}ms", t.as_millis())
    }
}

/// Wraps every operator of `plan` in a [`GuardExec`].
pub fn guard_plan(
    plan: Arc<dyn ExecutionPlan>,
    guard: &Arc<QueryGuard>,
) -> Result<Arc<dyn ExecutionPlan>> {
    use datafusion::common::tree_node::{Transformed, TreeNode};
    plan.transform_up(|node| {
        Ok(Transformed::yes(
            Arc::new(GuardExec::new(node, guard.clone())) as Arc<dyn ExecutionPlan>,
        ))
    })
    .map(|t| t.data)
}

use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};

/// Checks its query's [`QueryGuard`] before every batch of its input, and returns
/// `Pending` (waking itself at once) every [`GuardExec::YIELD_EVERY`] batches.
#[derive(Debug)]
pub struct GuardExec {
    input: Arc<dyn ExecutionPlan>,
    guard: Arc<QueryGuard>,
}

impl GuardExec {
    /// Batches between two yields of the thread.
    pub const YIELD_EVERY: u32 = 8;

    pub fn new(input: Arc<dyn ExecutionPlan>, guard: Arc<QueryGuard>) -> Self {
        Self { input, guard }
    }
}

impl DisplayAs for GuardExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GuardExec")
    }
}

impl ExecutionPlan for GuardExec {
    fn name(&self) -> &str {
        "GuardExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.input.properties()
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(
            &Arc<dyn datafusion::physical_plan::PhysicalExpr>,
        ) -> Result<datafusion::common::tree_node::TreeNodeRecursion>,
    ) -> Result<datafusion::common::tree_node::TreeNodeRecursion> {
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(Self::new(
            children.swap_remove(0),
            self.guard.clone(),
        )))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        self.guard.check()?;
        Ok(Box::pin(GuardStream {
            inner: self.input.execute(partition, context)?,
            guard: self.guard.clone(),
            polls: 0,
        }))
    }
}

struct GuardStream {
    inner: SendableRecordBatchStream,
    guard: Arc<QueryGuard>,
    polls: u32,
}

impl futures::Stream for GuardStream {
    type Item = Result<arrow::record_batch::RecordBatch>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if let Err(e) = self.guard.check() {
            return std::task::Poll::Ready(Some(Err(e)));
        }
        self.polls = self.polls.wrapping_add(1);
        if self.polls.is_multiple_of(GuardExec::YIELD_EVERY) {
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        self.inner.as_mut().poll_next(cx)
    }
}

impl datafusion::physical_plan::RecordBatchStream for GuardStream {
    fn schema(&self) -> arrow::datatypes::SchemaRef {
        self.inner.schema()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_nesting_counts_calls_not_parentheses_strings_or_comments() {
        assert_eq!(function_nesting("SELECT 1"), 0);
        assert_eq!(function_nesting("SELECT ((((1))))"), 0);
        assert_eq!(
            function_nesting("SELECT 1 WHERE x IN (SELECT y FROM (SELECT 1) AS t) AND (z)"),
            0
        );
        assert_eq!(
            function_nesting("SELECT length(concat(CAST(x AS VARCHAR), 'x'))"),
            3
        );
        assert_eq!(function_nesting("SELECT f(1), g(h(2))"), 2);
        assert_eq!(
            function_nesting("SELECT 'length(length(' || x -- abs(abs(\n"),
            0
        );
        assert_eq!(
            function_nesting("SELECT /* f(f( */ \"q\"(\"a\"\"(\"(1))"),
            2
        );
        assert_eq!(function_nesting("SELECT count (x)"), 1);
        // Unbalanced text is the parser's to refuse, not a panic here.
        assert_eq!(function_nesting("SELECT f(g(("), 2);
        assert_eq!(function_nesting("SELECT ))) f(1"), 1);
    }

    #[test]
    fn deeply_nested_calls_are_refused_before_the_parser_backtracks() {
        // Issue 10's class (a short query freezing a query thread): 30 levels of
        // length( would keep the parser busy for hours.
        let nest = |n: usize| format!("SELECT {}1{}", "length(".repeat(n), ")".repeat(n));
        let limits = QueryLimits::default();
        assert!(check_text(&nest(MAX_FUNCTION_NESTING), &limits).is_ok());
        let e = check_text(&nest(30), &limits).unwrap_err().to_string();
        assert!(e.contains("nests function calls 30 deep"), "{e}");
    }
}

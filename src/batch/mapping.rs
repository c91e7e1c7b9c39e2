//! Column mapping: how a user's CSV headers map onto segmentd's fields, per kind of file.
//!
//! Every field has a canonical column name (the field's own name, matched case-insensitively),
//! so files written with those names need no mapping. Anything else is mapped in the config
//! (`[input.orders.columns] customer_id = "household_id"`) or with a flag
//! (`--map customer_id=household_id`, `--map returns.amount=refund`). A mapping that names a
//! column the file does not have is an error that lists the columns it does have.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The kinds of input file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// One row per order line (and, with an `event_type` column, return lines).
    Orders,
    /// One row per refund.
    Returns,
    /// One row per support contact.
    Support,
    /// One row per messaging interaction.
    Engagement,
}

impl FileKind {
    /// All kinds.
    pub const ALL: [FileKind; 4] = [Self::Orders, Self::Returns, Self::Support, Self::Engagement];

    /// Name used in flags and config sections.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Orders => "orders",
            Self::Returns => "returns",
            Self::Support => "support",
            Self::Engagement => "engagement",
        }
    }

    /// Parses a kind name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// The fields this kind of file can have, with whether each is required.
    pub fn fields(self) -> &'static [(Field, Need)] {
        use Field::*;
        use Need::*;
        match self {
            Self::Orders => &[
                (CustomerId, Required),
                (EventTime, Required),
                (OrderId, Optional),
                (ProductId, Optional),
                (Category, Optional),
                (Quantity, Optional),
                (UnitPrice, OneOf(1)),
                (LineTotal, OneOf(1)),
                (ListPrice, Optional),
                (Discount, Optional),
                (Channel, Optional),
                (EventType, Optional),
            ],
            Self::Returns => &[
                (CustomerId, Required),
                (EventTime, Required),
                (ReturnId, Optional),
                (OrderId, Optional),
                (Amount, Required),
                (Reason, Optional),
            ],
            Self::Support => &[
                (CustomerId, Required),
                (EventTime, Required),
                (ContactId, Optional),
                (Topic, Required),
                (Complexity, Required),
            ],
            Self::Engagement => &[
                (CustomerId, Required),
                (EventTime, Required),
                (EventId, Optional),
                (Channel, Required),
                (Action, Required),
            ],
        }
    }
}

/// Whether a field must be present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Must be mapped.
    Required,
    /// May be mapped.
    Optional,
    /// At least one field of the group with this number must be mapped.
    OneOf(u8),
}

/// A field segmentd reads from a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Field {
    /// Customer id.
    CustomerId,
    /// Event time.
    EventTime,
    /// Id of an order (order lines with the same id form one order).
    OrderId,
    /// Id of a return.
    ReturnId,
    /// Id of a support contact.
    ContactId,
    /// Id of an engagement event.
    EventId,
    /// Product id.
    ProductId,
    /// Product category.
    Category,
    /// Units on the line (default 1).
    Quantity,
    /// Price paid per unit.
    UnitPrice,
    /// Amount paid for the line.
    LineTotal,
    /// List price per unit.
    ListPrice,
    /// Discount amount on the line (sign ignored).
    Discount,
    /// Order channel or messaging channel.
    Channel,
    /// `order` or `return` on an orders file.
    EventType,
    /// Refunded amount.
    Amount,
    /// Return reason.
    Reason,
    /// Support topic.
    Topic,
    /// Support complexity, 1–5.
    Complexity,
    /// Engagement action.
    Action,
}

impl Field {
    /// The canonical name, used as the default column name and in mappings.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CustomerId => "customer_id",
            Self::EventTime => "event_time",
            Self::OrderId => "order_id",
            Self::ReturnId => "return_id",
            Self::ContactId => "contact_id",
            Self::EventId => "event_id",
            Self::ProductId => "product_id",
            Self::Category => "category",
            Self::Quantity => "quantity",
            Self::UnitPrice => "unit_price",
            Self::LineTotal => "line_total",
            Self::ListPrice => "list_price",
            Self::Discount => "discount",
            Self::Channel => "channel",
            Self::EventType => "event_type",
            Self::Amount => "amount",
            Self::Reason => "reason",
            Self::Topic => "topic",
            Self::Complexity => "complexity",
            Self::Action => "action",
        }
    }
}

/// Why a mapping could not be resolved against a file's header.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum MappingError {
    /// The mapping names a field the kind of file does not have.
    #[error("{kind} files have no field {field:?} (fields: {known})")]
    UnknownField {
        /// File kind.
        kind: &'static str,
        /// The field named.
        field: String,
        /// The fields it has.
        known: String,
    },
    /// The mapping names a column the file lacks.
    #[error("{kind} field {field} is mapped to column {column:?}, which the file does not have (columns: {columns})")]
    MissingColumn {
        /// File kind.
        kind: &'static str,
        /// The field.
        field: &'static str,
        /// The column named.
        column: String,
        /// The file's columns.
        columns: String,
    },
    /// A required field has neither a mapping nor a canonical column.
    #[error("{kind} file has no column for {field} (columns: {columns}); map one with --map {prefix}{field}=COLUMN")]
    Unmapped {
        /// File kind.
        kind: &'static str,
        /// The field (or fields, for a one-of group).
        field: String,
        /// The file's columns.
        columns: String,
        /// `returns.` etc. for non-order files.
        prefix: &'static str,
    },
    /// A `--map` argument is not `field=column`.
    #[error("mapping {0:?} is not FIELD=COLUMN (or KIND.FIELD=COLUMN)")]
    Syntax(String),
}

/// The user's column names per field, for one kind of file.
pub type ColumnMap = BTreeMap<String, String>;

/// Parses `--map` arguments into per-kind column maps. A bare field applies to orders.
pub fn parse_map_args(args: &[String]) -> Result<BTreeMap<FileKind, ColumnMap>, MappingError> {
    let mut out: BTreeMap<FileKind, ColumnMap> = BTreeMap::new();
    for arg in args {
        let (key, column) = arg
            .split_once('=')
            .filter(|(k, c)| !k.trim().is_empty() && !c.trim().is_empty())
            .ok_or_else(|| MappingError::Syntax(arg.clone()))?;
        let (kind, field) = match key.split_once('.') {
            Some((kind, field)) => (
                FileKind::parse(kind.trim()).ok_or_else(|| MappingError::Syntax(arg.clone()))?,
                field.trim(),
            ),
            None => (FileKind::Orders, key.trim()),
        };
        out.entry(kind)
            .or_default()
            .insert(field.to_owned(), column.trim().to_owned());
    }
    Ok(out)
}

/// Field → column index for one file.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedColumns {
    columns: BTreeMap<Field, usize>,
}

impl ResolvedColumns {
    /// The column index of a field, if the file has it.
    pub fn get(&self, field: Field) -> Option<usize> {
        self.columns.get(&field).copied()
    }

    /// Whether the file has the field.
    pub fn has(&self, field: Field) -> bool {
        self.columns.contains_key(&field)
    }
}

/// The index of the column named `name` in a header, ignoring case and surrounding spaces.
pub fn find_column(headers: &[String], name: &str) -> Option<usize> {
    headers
        .iter()
        .position(|h| h.trim().eq_ignore_ascii_case(name.trim()))
}

/// Resolves a mapping against a header row.
pub fn resolve(
    kind: FileKind,
    headers: &[String],
    map: &ColumnMap,
) -> Result<ResolvedColumns, MappingError> {
    let fields = kind.fields();
    let listing = || headers.join(", ");
    for key in map.keys() {
        if !fields.iter().any(|(f, _)| f.as_str() == key) {
            return Err(MappingError::UnknownField {
                kind: kind.as_str(),
                field: key.clone(),
                known: fields
                    .iter()
                    .map(|(f, _)| f.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    }
    let find = |name: &str| find_column(headers, name);
    let mut columns = BTreeMap::new();
    for &(field, _) in fields {
        match map.get(field.as_str()) {
            Some(column) => {
                let idx = find(column).ok_or_else(|| MappingError::MissingColumn {
                    kind: kind.as_str(),
                    field: field.as_str(),
                    column: column.clone(),
                    columns: listing(),
                })?;
                columns.insert(field, idx);
            }
            None => {
                if let Some(idx) = find(field.as_str()) {
                    columns.insert(field, idx);
                }
            }
        }
    }
    let prefix = match kind {
        FileKind::Orders => "",
        FileKind::Returns => "returns.",
        FileKind::Support => "support.",
        FileKind::Engagement => "engagement.",
    };
    for &(field, need) in fields {
        let missing = match need {
            Need::Required => (!columns.contains_key(&field)).then(|| field.as_str().to_owned()),
            Need::OneOf(group) => {
                let members: Vec<Field> = fields
                    .iter()
                    .filter(|(_, n)| *n == Need::OneOf(group))
                    .map(|(f, _)| *f)
                    .collect();
                (!members.iter().any(|f| columns.contains_key(f))).then(|| {
                    members
                        .iter()
                        .map(|f| f.as_str())
                        .collect::<Vec<_>>()
                        .join(" or ")
                })
            }
            Need::Optional => None,
        };
        if let Some(field) = missing {
            return Err(MappingError::Unmapped {
                kind: kind.as_str(),
                field,
                columns: listing(),
                prefix,
            });
        }
    }
    Ok(ResolvedColumns { columns })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn canonical_names_need_no_mapping() {
        let h = headers(&["Customer_ID", "event_time", "line_total", "quantity"]);
        let r = resolve(FileKind::Orders, &h, &ColumnMap::new()).unwrap();
        assert_eq!(r.get(Field::CustomerId), Some(0));
        assert_eq!(r.get(Field::LineTotal), Some(2));
        assert!(!r.has(Field::Category));
    }

    #[test]
    fn a_retail_export_maps_with_flags() {
        let h = headers(&[
            "household_id",
            "basket_id",
            "product_id",
            "quantity",
            "sales_value",
            "retail_disc",
            "transaction_timestamp",
        ]);
        let maps = parse_map_args(&[
            "customer_id=household_id".into(),
            "order_id=basket_id".into(),
            "line_total=sales_value".into(),
            "discount=retail_disc".into(),
            "event_time=transaction_timestamp".into(),
        ])
        .unwrap();
        let r = resolve(FileKind::Orders, &h, &maps[&FileKind::Orders]).unwrap();
        assert_eq!(r.get(Field::OrderId), Some(1));
        assert_eq!(r.get(Field::Discount), Some(5));
        assert_eq!(r.get(Field::ProductId), Some(2));
    }

    #[test]
    fn errors_say_what_to_do() {
        let h = headers(&["customer_id", "date", "amount"]);
        let err = resolve(FileKind::Orders, &h, &ColumnMap::new()).unwrap_err();
        assert!(err.to_string().contains("--map event_time=COLUMN"), "{err}");
        let maps = parse_map_args(&["event_time=when".into()]).unwrap();
        let err = resolve(FileKind::Orders, &h, &maps[&FileKind::Orders]).unwrap_err();
        assert!(
            err.to_string()
                .contains("columns: customer_id, date, amount"),
            "{err}"
        );
        let maps = parse_map_args(&["event_time=date".into()]).unwrap();
        let err = resolve(FileKind::Orders, &h, &maps[&FileKind::Orders]).unwrap_err();
        assert!(
            err.to_string().contains("unit_price or line_total"),
            "{err}"
        );
        let maps = parse_map_args(&["colour=date".into()]).unwrap();
        assert!(matches!(
            resolve(FileKind::Orders, &h, &maps[&FileKind::Orders]),
            Err(MappingError::UnknownField { .. })
        ));
    }

    #[test]
    fn map_args_take_a_kind_prefix() {
        let maps =
            parse_map_args(&["returns.amount=refund".into(), "quantity=qty".into()]).unwrap();
        assert_eq!(maps[&FileKind::Returns]["amount"], "refund");
        assert_eq!(maps[&FileKind::Orders]["quantity"], "qty");
        assert!(parse_map_args(&["nonsense".into()]).is_err());
        assert!(parse_map_args(&["bogus.amount=x".into()]).is_err());
    }
}

//! The shape of every configuration section: a plain, deserialisable struct whose
//! [`Section::check`] is the only way to a [`Checked`] value. Each module defines the section it
//! reads and its checks; `config.rs` assembles the sections and checks each once, so code that
//! takes a `Checked<T>` never sees a value out of range. (The `Params` → `check()` →
//! `ValidParams` pattern, made generic so that one type serves every section.)

use std::ops::Deref;

use thiserror::Error;

/// A section of the configuration file.
pub trait Section: Sized {
    /// The section's table in the file (`kafka`, `discover`, ...), named in errors.
    const KEY: &'static str;

    /// Every value in range and the values consistent with each other; the message names the
    /// offending keys within the section.
    fn problems(&self) -> Result<(), String>;

    /// The section, checked.
    fn check(self) -> Result<Checked<Self>, SectionError> {
        match self.problems() {
            Ok(()) => Ok(Checked(self)),
            Err(message) => Err(SectionError {
                section: Self::KEY,
                message,
            }),
        }
    }
}

/// A section that has passed its checks; it derefs to the section.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked<T>(T);

impl<T> Checked<T> {
    /// The section, for code that changes it (and must check it again).
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> Deref for Checked<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

/// A section with a value out of range.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{section}: {message}")]
pub struct SectionError {
    /// The section's table.
    pub section: &'static str,
    /// What is wrong, naming the keys.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Window {
        seconds: u64,
    }

    impl Section for Window {
        const KEY: &'static str = "window";
        fn problems(&self) -> Result<(), String> {
            if self.seconds == 0 {
                return Err("seconds must be at least 1".into());
            }
            Ok(())
        }
    }

    #[test]
    fn only_a_section_without_problems_is_checked() {
        let checked = Window { seconds: 3 }.check().unwrap();
        assert_eq!(checked.seconds, 3);
        assert_eq!(checked.into_inner(), Window { seconds: 3 });
        let err = Window { seconds: 0 }.check().unwrap_err();
        assert_eq!(err.to_string(), "window: seconds must be at least 1");
    }
}

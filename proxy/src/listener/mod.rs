//! Listeners: the LDS socket listeners and in-process internal listeners ([`manager`]), what a
//! connection carries ([`conn`]), the listener filters that sniff ([`inspect`]), filter chain
//! selection ([`chain`]), filter chain drains on LDS updates ([`drain`]).

pub mod chain;
pub mod conn;
pub mod drain;
pub mod inspect;
pub mod manager;

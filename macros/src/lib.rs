//! Implementation detail of [instastate](https://docs.rs/instastate): the
//! `defstate!` macro. Depend on `instastate`, which re-exports it, not on this crate.

#![forbid(unsafe_code)]

mod expand;
mod parse;
mod validate;

use proc_macro::TokenStream;

/// Declares state cells; see the `instastate` crate's documentation.
#[proc_macro]
pub fn defstate(input: TokenStream) -> TokenStream {
    let decls = syn::parse_macro_input!(input as parse::Decls);
    expand::expand(decls).into()
}

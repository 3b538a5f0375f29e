//! What `defstate!` becomes.

use proc_macro2::{Ident, Span, TokenStream, TokenTree};
use quote::{ToTokens, format_ident, quote, quote_spanned};
use syn::{Type, spanned::Spanned};

use crate::{
    parse::{Decl, Decls},
    validate::{Attrs, Migration, validate},
};

pub(crate) fn expand(Decls(decls): Decls) -> TokenStream {
    decls.iter().map(expand_one).collect()
}

fn expand_one(decl: &Decl) -> TokenStream {
    let (attrs, errors) = validate(decl);
    let Decl { vis, ident, ty, init, .. } = decl;
    let krate = attrs.krate.as_ref().map_or_else(|| quote!(::instastate), |path| quote!(#path));
    let ident_str = ident.to_string();
    let name = attrs.name.as_ref().map_or_else(
        || quote!(::core::concat!(::core::module_path!(), "::", #ident_str)),
        |lit| quote!(#lit),
    );
    // Where the cell was declared, for errors that must tell two cells apart.
    let origin = quote! {
        ::core::concat!(
            ::core::module_path!(), "::", #ident_str,
            " (", ::core::file!(), ":", ::core::line!(), ")"
        )
    };
    let rest = &attrs.rest;
    // `cfg` attributes must also remove the registration, or it would name a
    // `static` that does not exist.
    let cfgs = &attrs.cfgs;
    // Problems with the type are reported at the type: the tokens around it take
    // its first and last tokens' spans, which rustc joins into the type's span.
    let (first, last) = edge_spans(ty);
    let cell_krate = respan(krate.clone(), first);
    let spanned_ty = {
        let open = quote_spanned!(first=> <);
        let close = quote_spanned!(last=> >);
        quote!(#open #ty #close)
    };
    // Every `static` must be `Sync`; a cell's type that is not is reported here.
    let cell_ty = quote!(#cell_krate::StateCell #spanned_ty);
    // The helper names the cell's identifier, so it must not shadow it; and it sits
    // outside the `ctor!` expansion, whose own items could shadow the identifier.
    let register_fn = unlike(ident, "__instastate_register");
    // A type that is not an `instastate::Value` is reported here, at the type, with
    // `Value`'s own message.
    let checked = quote!(#krate::__private::register::#spanned_ty);
    let options = options(&krate, ty, &attrs);
    let errors = errors.map(|err| err.to_compile_error());
    quote! {
        #errors
        #(#rest)*
        #vis static #ident: #cell_ty = #krate::__private::new_cell(#name, #origin, || #init, #options);
        #(#cfgs)*
        const _: () = {
            // A deprecated cell is registered without a warning.
            #[allow(deprecated)]
            fn #register_fn() {
                #checked(&#ident);
            }
            #krate::__private::ctor::declarative::ctor! {
                #[ctor(unsafe)]
                fn __instastate_ctor() {
                    #register_fn();
                }
            }
        };
    }
}

/// The cell's `CellOptions`, with only the parts its attributes give.
fn options(krate: &TokenStream, ty: &Type, attrs: &Attrs) -> TokenStream {
    let mut options = quote!(#krate::CellOptions::new());
    if let Some(version) = &attrs.version {
        let number = version.number;
        let number = quote_spanned!(version.lit.span()=> #number);
        options = quote!(#options.version(#number));
    }
    if !attrs.migrations.is_empty() {
        let migrations = attrs.migrations.iter().map(|it| migration(krate, ty, it));
        // In a `static`'s initializer these temporaries live for `'static`.
        options = quote!(#options.migrations(&[#(#migrations),*]));
    }
    if !attrs.aliases.is_empty() {
        let aliases = &attrs.aliases;
        options = quote!(#options.aliases(&[#(#aliases),*]));
    }
    if let Some(journaled) = &attrs.journaled {
        // Spanned at the attribute: a type that is not `Prevalent` is reported there.
        options = quote_spanned!(journaled.span()=> #options.journaled());
    }
    options
}

/// A migration, as a `&dyn Migrate<T>`. Naming the cell's type makes a function of
/// the wrong type a type mismatch, and every token of the expression has the
/// function's span, so rustc reports that and an old type that is not
/// `DeserializeOwned` at the function.
fn migration(
    krate: &TokenStream,
    ty: &Type,
    Migration { from, function }: &Migration,
) -> TokenStream {
    let span = function.span();
    let krate = respan(krate.clone(), span);
    let ty = respan(ty.to_token_stream(), span);
    let number = from.number;
    quote_spanned! {span=>
        &#krate::Migration::<_, #ty>::new(#number, #function)
    }
}

/// `name`, with `_` appended until it differs from `ident`.
fn unlike(ident: &Ident, name: &str) -> Ident {
    let mut name = name.to_owned();
    while ident == &name {
        name.push('_');
    }
    format_ident!("{name}")
}

/// The spans of the first and last tokens of `ty`.
fn edge_spans(ty: &Type) -> (Span, Span) {
    let mut tokens = ty.to_token_stream().into_iter();
    let edge = |tree: TokenTree, open: bool| match tree {
        TokenTree::Group(group) if open => group.span_open(),
        TokenTree::Group(group) => group.span_close(),
        tree => tree.span(),
    };
    let first = tokens.next().map_or_else(Span::call_site, |tree| edge(tree, true));
    let last = tokens.last().map_or(first, |tree| edge(tree, false));
    (first, last)
}

/// `tokens` with every span set to `span`.
fn respan(tokens: TokenStream, span: Span) -> TokenStream {
    tokens
        .into_iter()
        .map(|mut tree| {
            if let TokenTree::Group(group) = &tree {
                let mut inner =
                    proc_macro2::Group::new(group.delimiter(), respan(group.stream(), span));
                inner.set_span(span);
                tree = TokenTree::Group(inner);
            } else {
                tree.set_span(span);
            }
            tree
        })
        .collect()
}

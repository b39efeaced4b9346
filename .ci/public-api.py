#!/usr/bin/env python3
"""Prints the public API of a crate from its rustdoc JSON, one sorted line
per item: modules, types with their attributes, fields and variants,
functions and methods with their signatures, trait items, constants and
re-exports. `.ci/run` diffs it against the committed snapshot, so a change
to the contract is a visible, deliberate edit of that file.

Usage: public-api.py target/doc/<crate>.json
"""
import json
import sys

doc = json.load(open(sys.argv[1]))
index = doc["index"]
crate = index[str(doc["root"])]["name"]
lines = set()


def ty(t):
    """A type, written roughly as Rust would write it."""
    if t is None:
        return "()"
    (kind, v), = t.items()
    if kind == "primitive" or kind == "generic":
        return v
    if kind == "resolved_path":
        return v["path"].split("::")[-1] + args(v.get("args"))
    if kind == "borrowed_ref":
        life = (v.get("lifetime") or "") + " " if v.get("lifetime") else ""
        return "&" + life + ("mut " if v["is_mutable"] else "") + ty(v["type"])
    if kind == "raw_pointer":
        return "*" + ("mut " if v["is_mutable"] else "const ") + ty(v["type"])
    if kind == "slice":
        return "[" + ty(v) + "]"
    if kind == "array":
        return "[" + ty(v["type"]) + "; " + v["len"] + "]"
    if kind == "tuple":
        return "(" + ", ".join(ty(x) for x in v) + ")"
    if kind == "impl_trait":
        return "impl " + " + ".join(bound(b) for b in v)
    if kind == "dyn_trait":
        traits = [p["trait"]["path"].split("::")[-1] + args(p["trait"].get("args")) for p in v["traits"]]
        if v.get("lifetime"):
            traits.append(v["lifetime"])
        return "dyn " + " + ".join(traits)
    if kind == "qualified_path":
        return "<" + ty(v["self_type"]) + ">::" + v["name"]
    if kind == "function_pointer":
        return "fn(" + ", ".join(ty(i[1]) for i in v["sig"]["inputs"]) + ") -> " + ty(v["sig"]["output"])
    return kind


def bound(b):
    (kind, v), = b.items()
    if kind == "trait_bound":
        maybe = "?" if v.get("modifier") == "maybe" else ""
        return maybe + v["trait"]["path"].split("::")[-1] + args(v["trait"].get("args"))
    if kind == "outlives":
        return v
    return kind


def args(a):
    if not a:
        return ""
    (kind, v), = a.items()
    if kind == "angle_bracketed":
        parts = []
        for g in v["args"]:
            (k, x), = g.items()
            parts.append(ty(x) if k == "type" else str(x))
        for c in v.get("constraints", []):
            b = c.get("binding") or {}
            if "equality" in b and "type" in b["equality"]:
                parts.append(c["name"] + " = " + ty(b["equality"]["type"]))
            else:
                parts.append(c["name"] + ": " + " + ".join(bound(x) for x in b.get("constraint", [])))
        return "<" + ", ".join(parts) + ">" if parts else ""
    if kind == "parenthesized":
        return "(" + ", ".join(ty(x) for x in v["inputs"]) + ") -> " + ty(v.get("output"))
    return ""


def generics(g):
    params = []
    for p in g["params"]:
        (k, v), = p["kind"].items()
        if k == "type":
            bs = " + ".join(bound(b) for b in v["bounds"])
            params.append(p["name"] + (": " + bs if bs else ""))
        elif k == "lifetime":
            params.append(p["name"])
        elif k == "const":
            params.append("const " + p["name"] + ": " + ty(v["type"]))
    return "<" + ", ".join(params) + ">" if params else ""


def attrs(item):
    out = []
    for a in item.get("attrs", []):
        if a == "non_exhaustive" or (isinstance(a, dict) and "non_exhaustive" in str(a)):
            out.append("#[non_exhaustive]")
        elif isinstance(a, dict) and "repr" in a:
            out.append("#[repr]")
    return (" ".join(out) + " ") if out else ""


def signature(name, f):
    h = f["header"]
    quals = (" [const]" if h["is_const"] else "") + (" [unsafe]" if h["is_unsafe"] else "")
    def param(n, t):
        if n == "self":
            return {"Self": "self", "&Self": "&self", "&mut Self": "&mut self"}.get(ty(t), "self: " + ty(t))
        return n + ": " + ty(t)

    inputs = ", ".join(param(n, t) for n, t in f["sig"]["inputs"])
    out = f["sig"]["output"]
    return name + generics(f["generics"]) + "(" + inputs + ")" + (" -> " + ty(out) if out else "") + quals


def emit(path, item):
    inner = item["inner"]
    (kind, v), = inner.items()
    if kind == "module":
        lines.add("mod " + path)
        for i in v["items"]:
            visit(path, i)
    elif kind == "struct":
        lines.add(attrs(item) + "struct " + path + generics(v["generics"]))
        sk = v["kind"]
        if "plain" in sk:
            for f in sk["plain"]["fields"]:
                fi = index[str(f)]
                if fi["visibility"] == "public":
                    lines.add("field " + path + "::" + fi["name"] + ": " + ty(fi["inner"]["struct_field"]))
        elif "tuple" in sk:
            for n, f in enumerate(sk["tuple"]):
                if f is not None:
                    lines.add("field " + path + "::" + str(n) + ": " + ty(index[str(f)]["inner"]["struct_field"]))
        impls(path, v["impls"])
    elif kind == "enum":
        lines.add(attrs(item) + "enum " + path + generics(v["generics"]))
        for var in v["variants"]:
            vi = index[str(var)]
            vk = vi["inner"]["variant"]["kind"]
            shape = ""
            if isinstance(vk, dict) and "tuple" in vk:
                shape = "(" + ", ".join(ty(index[str(f)]["inner"]["struct_field"]) for f in vk["tuple"] if f is not None) + ")"
            elif isinstance(vk, dict) and "struct" in vk:
                shape = " { " + ", ".join(index[str(f)]["name"] + ": " + ty(index[str(f)]["inner"]["struct_field"]) for f in vk["struct"]["fields"]) + " }"
            lines.add(attrs(vi) + "variant " + path + "::" + vi["name"] + shape)
        impls(path, v["impls"])
    elif kind == "trait":
        lines.add("trait " + path + generics(v["generics"]))
        for i in v["items"]:
            ti = index[str(i)]
            (tk, tv), = ti["inner"].items()
            if tk == "function":
                lines.add("trait-fn " + path + "::" + signature(ti["name"], tv))
            else:
                lines.add("trait-" + tk + " " + path + "::" + ti["name"])
    elif kind == "function":
        lines.add("fn " + path.rsplit("::", 1)[0] + "::" + signature(item["name"], v))
    elif kind == "constant":
        lines.add("const " + path + ": " + ty(v["type"]))
    elif kind == "static":
        lines.add("static " + path + ": " + ty(v["type"]))
    elif kind == "type_alias":
        lines.add("type " + path + " = " + ty(v["type"]))
    elif kind == "macro":
        lines.add("macro " + path)
    else:
        lines.add(kind + " " + path)


def impls(path, ids):
    for i in ids:
        im = index[str(i)]["inner"]["impl"]
        if im.get("is_synthetic") or im.get("blanket_impl"):
            continue
        if im["trait"] is not None:
            lines.add("impl " + im["trait"]["path"].split("::")[-1] + args(im["trait"].get("args")) + " for " + path)
            continue
        for it in im["items"]:
            x = index[str(it)]
            if x["visibility"] != "public":
                continue
            (k, v), = x["inner"].items()
            if k == "function":
                lines.add("method " + path + "::" + signature(x["name"], v))
            elif k == "assoc_const" or k == "constant":
                lines.add("assoc-const " + path + "::" + x["name"])


def visit(parent, id_):
    item = index.get(str(id_))
    if item is None or item["visibility"] != "public":
        return
    inner = item["inner"]
    if "use" in inner:
        u = inner["use"]
        name = u["name"]
        target = index.get(str(u["id"])) if u["id"] is not None else None
        if u["is_glob"]:
            if target and "module" in target["inner"]:
                for i in target["inner"]["module"]["items"]:
                    visit(parent, i)
            return
        if target is None:
            lines.add("use " + parent + "::" + name + " = " + u["source"])
            return
        emit(parent + "::" + name, dict(target, name=name))
        return
    emit(parent + "::" + item["name"], item)


root = index[str(doc["root"])]
for i in root["inner"]["module"]["items"]:
    visit(crate, i)
print("\n".join(sorted(lines)))

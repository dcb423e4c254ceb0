/* Newest-first merge of a chunk's JSON lines with simdjson (used by _jsonlines.pyx).

   The rule (runner/_fast/jsonlines_py.py) merges lines oldest first: an object value merges
   into an object already there, anything else replaces.  Applied in that order, most values
   of a chunk are built only to be replaced by a later line.  Here the lines are applied
   newest first into an *accumulator* tree of C++ nodes, and a Python value is built only when
   no later line has decided its key:

   - a key a node lacks takes the value (an object becomes an open node);
   - a key holding a leaf (anything but an object) was decided by a later line: skipped;
   - a key holding an open node takes an earlier object's keys the same way (recursively), and
     is *sealed* by an earlier non-object value (oldest first, that value was replaced by a
     whole object: nothing before it reaches the node); a sealed node takes nothing more.

   Every visit of a key, decided or not, lowers the key's *stamp* to where it occurs (line,
   then position in the line): oldest first, that is where the key was first inserted, and a
   dict keeps that place when the value is replaced.  ``merge_final`` then merges the
   accumulator into the document the rule's way (an open node merges into a dict there; a
   sealed node or a leaf replaces), adding new keys in stamp order, so the document equals the
   rule's, key order included.

   Keys of one object are walked in their order; an object with two equal keys, where the rule
   keeps the last value at the first key's place, is first built as a dict and applied as such
   (``apply_parsed`` applies dicts the same way: lines the stdlib rule parsed).  At the top
   level ``runner`` and ``asset`` are skipped and ``studioml`` values are collected; they are
   applied oldest first, add-only (its rule), when the merge reaches the stamp of the oldest
   of them.  Keys are kept as UTF-8 with surrogates passed through, so a key with a lone
   surrogate (stdlib-parsed) survives.
   Errors: a function returning -1 (or null) has set a Python exception; the document is
   untouched until ``merge_final``. */
#ifndef RUNNER_SJMERGE_H
#define RUNNER_SJMERGE_H

#include <Python.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "simdjson.h"

namespace runner_sj {

using simdjson::dom::element;
using simdjson::dom::element_type;
using simdjson::dom::object;

struct Node;

struct Entry {
    int64_t first = INT64_MAX;  /* stamp of the oldest occurrence seen */
    PyObject *leaf = nullptr;   /* owned: the value, when it is not an object */
    Node *node = nullptr;       /* owned: the open or sealed node, when it is an object */
};

struct Node {
    std::unordered_map<std::string, Entry> entries;
    bool sealed = false;
    ~Node()
    {
        for (auto &item : entries) {
            Py_XDECREF(item.second.leaf);
            delete item.second.node;
        }
    }
};

struct Accumulator {
    Node root;
    int64_t line = 0;      /* lines applied so far (newest first) */
    int64_t position = 0;  /* keys visited in the current line */
    PyObject *studioml = PyList_New(0);  /* top-level "studioml" values, newest first */
    int64_t studioml_first = INT64_MAX;  /* stamp of the oldest of them */
    ~Accumulator() { Py_XDECREF(studioml); }

    /* Stamps grow oldest first: the n-th line applied (newest first) gets a lower base. */
    void begin_line() { line += 1; position = 0; }
    int64_t stamp() { return (INT64_MAX / 2 - (line << 32)) + position++; }
};

static inline simdjson::dom::parser &parser()
{
    static thread_local simdjson::dom::parser instance;
    return instance;
}

static inline PyObject *new_str(std::string_view s)
{
    return PyUnicode_DecodeUTF8(s.data(), (Py_ssize_t)s.size(), "surrogatepass");
}

static PyObject *to_python(element value);

/* ``dict[key] = val``, both new references given up here (null: building it failed, with a
   Python error set); -1 on failure. */
static int put_new(PyObject *dict, PyObject *key, PyObject *val)
{
    int r = (key && val) ? PyDict_SetItem(dict, key, val) : -1;
    Py_XDECREF(key);
    Py_XDECREF(val);
    return r;
}

static PyObject *object_to_dict(object obj)
{
    PyObject *dict = PyDict_New();
    if (!dict)
        return nullptr;
    for (auto field : obj) {
        PyObject *key = new_str(field.key);
        if (put_new(dict, key, key ? to_python(field.value) : nullptr) < 0) {
            Py_DECREF(dict);
            return nullptr;
        }
    }
    return dict;
}

/* A new Python object for ``value`` (what json.loads builds for it). */
static PyObject *to_python(element value)
{
    switch (value.type()) {
    case element_type::OBJECT:
        return object_to_dict(value.get_object().value_unsafe());
    case element_type::ARRAY: {
        /* a copy: value_unsafe() of the temporary result would dangle in a range-for */
        simdjson::dom::array array = value.get_array().value_unsafe();
        PyObject *list = PyList_New(0);
        if (!list)
            return nullptr;
        for (element item : array) {
            PyObject *v = to_python(item);
            if (!v || PyList_Append(list, v) < 0) {
                Py_XDECREF(v);
                Py_DECREF(list);
                return nullptr;
            }
            Py_DECREF(v);
        }
        return list;
    }
    case element_type::STRING:
        return new_str(value.get_string().value_unsafe());
    case element_type::INT64:
        return PyLong_FromLongLong(value.get_int64().value_unsafe());
    case element_type::UINT64:
        return PyLong_FromUnsignedLongLong(value.get_uint64().value_unsafe());
    case element_type::DOUBLE:
        return PyFloat_FromDouble(value.get_double().value_unsafe());
    case element_type::BOOL:
        return PyBool_FromLong(value.get_bool().value_unsafe());
    default:
        Py_RETURN_NONE;
    }
}

/* Whether two keys of ``obj`` are equal (an open-addressing table of key indexes). */
static bool has_duplicate_keys(object obj)
{
    std::string_view keys[64];
    uint8_t table[128];
    size_t n = 0;
    std::memset(table, 0, sizeof table);
    for (auto field : obj) {
        if (n == 64) {  /* rare: wide objects take the exact, slower path */
            std::unordered_set<std::string_view> seen;
            for (auto f : obj)
                if (!seen.insert(f.key).second)
                    return true;
            return false;
        }
        std::string_view key = field.key;
        uint32_t h = 2166136261u;
        for (unsigned char c : key)
            h = (h ^ c) * 16777619u;
        size_t slot = h & 127;
        while (table[slot]) {
            if (keys[table[slot] - 1] == key)
                return true;
            slot = (slot + 1) & 127;
        }
        keys[n++] = key;
        table[slot] = (uint8_t)n;
    }
    return false;
}

/* A Python str key as the UTF-8 (surrogates passed) bytes nodes are keyed by; false with a
   Python error when it is no str (stdlib-parsed lines only have str keys). */
static bool key_bytes(PyObject *key, std::string &out)
{
    PyObject *encoded = PyUnicode_AsEncodedString(key, "utf-8", "surrogatepass");
    if (!encoded)
        return false;
    out.assign(PyBytes_AS_STRING(encoded), (size_t)PyBytes_GET_SIZE(encoded));
    Py_DECREF(encoded);
    return true;
}

static int fill_from_object(Accumulator &acc, Node *node, object src);
static int fill_from_dict(Accumulator &acc, Node *node, PyObject *src);

/* Turn a new key's value into its entry: an object becomes an open node, the rest a leaf. */
static int set_from_element(Accumulator &acc, Entry &entry, element value)
{
    if (value.type() == element_type::OBJECT) {
        entry.node = new Node();
        return fill_from_object(acc, entry.node, value.get_object().value_unsafe());
    }
    entry.leaf = to_python(value);
    return entry.leaf ? 0 : -1;
}

static int set_from_python(Accumulator &acc, Entry &entry, PyObject *value)
{
    if (PyDict_Check(value)) {
        entry.node = new Node();
        return fill_from_dict(acc, entry.node, value);
    }
    Py_INCREF(value);
    entry.leaf = value;
    return 0;
}

static int apply_object(Accumulator &acc, Node *node, object src, bool top);
static int apply_dict(Accumulator &acc, Node *node, PyObject *src, bool top);

/* A new node takes every key of one object: the same walk as an earlier line's. */
static int fill_from_object(Accumulator &acc, Node *node, object src)
{
    return apply_object(acc, node, src, false);
}

static int fill_from_dict(Accumulator &acc, Node *node, PyObject *src)
{
    return apply_dict(acc, node, src, false);
}

/* ``node``'s entry for the key ``name`` met at this point of a line, its stamp lowered to
   here; ``fresh`` tells whether no later line had it. */
static inline Entry &visit(Accumulator &acc, Node *node, const std::string &name, bool &fresh)
{
    Entry &entry = node->entries[name];
    int64_t stamp = acc.stamp();
    fresh = entry.first == INT64_MAX;
    entry.first = std::min(entry.first, stamp);
    return entry;
}

/* The step for a key ``entry`` already holds: true when the caller must descend into its
   open node (an object value); a non-object value seals the node. */
static inline bool descend(Entry &entry, bool value_is_object)
{
    if (!entry.node || entry.node->sealed)
        return false;  /* a later leaf, or a sealed node, decided this key */
    if (value_is_object)
        return true;
    entry.node->sealed = true;
    return false;
}

/* Apply an earlier line's object ``src`` under ``node`` (see the header comment). */
static int apply_object(Accumulator &acc, Node *node, object src, bool top)
{
    if (has_duplicate_keys(src)) {
        PyObject *dict = object_to_dict(src);
        if (!dict)
            return -1;
        int r = apply_dict(acc, node, dict, top);
        Py_DECREF(dict);
        return r;
    }
    std::string name;
    for (auto field : src) {
        std::string_view key = field.key;
        if (top && (key == "runner" || key == "asset"))
            continue;
        if (top && key == "studioml") {
            PyObject *v = to_python(field.value);
            int r = v ? PyList_Append(acc.studioml, v) : -1;
            Py_XDECREF(v);
            if (r < 0)
                return -1;
            acc.studioml_first = acc.stamp();  /* each is older than the last */
            continue;
        }
        name.assign(key.data(), key.size());
        bool fresh;
        Entry &entry = visit(acc, node, name, fresh);
        int r = 0;
        if (fresh)
            r = set_from_element(acc, entry, field.value);
        else if (descend(entry, field.value.type() == element_type::OBJECT))
            r = apply_object(acc, entry.node, field.value.get_object().value_unsafe(), false);
        if (r < 0)
            return -1;
    }
    return 0;
}

/* ``apply_object`` for a dict (a line the stdlib rule parsed, or an object with equal keys). */
static int apply_dict(Accumulator &acc, Node *node, PyObject *src, bool top)
{
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    std::string name;
    while (PyDict_Next(src, &pos, &key, &value)) {
        if (top && PyUnicode_Check(key)) {
            if (PyUnicode_CompareWithASCIIString(key, "runner") == 0 ||
                PyUnicode_CompareWithASCIIString(key, "asset") == 0)
                continue;
            if (PyUnicode_CompareWithASCIIString(key, "studioml") == 0) {
                if (PyList_Append(acc.studioml, value) < 0)
                    return -1;
                acc.studioml_first = acc.stamp();
                continue;
            }
        }
        if (!key_bytes(key, name))
            return -1;
        bool fresh;
        Entry &entry = visit(acc, node, name, fresh);
        int r = 0;
        if (fresh)
            r = set_from_python(acc, entry, value);
        else if (descend(entry, PyDict_Check(value)))
            r = apply_dict(acc, entry.node, value, false);
        if (r < 0)
            return -1;
    }
    return 0;
}

/* Parse one line and apply it: 1 applied (or not an object: ignored), 0 simdjson rejected
   it, -1 a Python error. */
static int apply_line(Accumulator &acc, const char *p, size_t n)
{
    element root;
    if (parser().parse(p, n, true).get(root) != simdjson::SUCCESS)
        return 0;
    if (root.type() != element_type::OBJECT)
        return 1;
    acc.begin_line();
    return apply_object(acc, &acc.root, root.get_object().value_unsafe(), true) < 0 ? -1 : 1;
}

/* Apply a line the stdlib rule parsed (a dict). */
static int apply_parsed(Accumulator &acc, PyObject *dict)
{
    acc.begin_line();
    return apply_dict(acc, &acc.root, dict, true);
}

typedef std::pair<const std::string *, Entry *> Item;

static std::vector<Item> in_stamp_order(Node *node)
{
    std::vector<Item> items;
    items.reserve(node->entries.size());
    for (auto &kv : node->entries)
        items.emplace_back(&kv.first, &kv.second);
    std::sort(items.begin(), items.end(),
              [](const Item &a, const Item &b) { return a.second->first < b.second->first; });
    return items;
}

/* A new reference to the Python value of ``entry`` (a node becomes a dict, keys in order). */
static PyObject *materialize(Entry *entry)
{
    if (entry->leaf) {
        Py_INCREF(entry->leaf);
        return entry->leaf;
    }
    PyObject *dict = PyDict_New();
    if (!dict)
        return nullptr;
    for (const Item &item : in_stamp_order(entry->node)) {
        PyObject *key = new_str(*item.first);
        if (put_new(dict, key, key ? materialize(item.second) : nullptr) < 0) {
            Py_DECREF(dict);
            return nullptr;
        }
    }
    return dict;
}

static int add_only(PyObject *dst, PyObject *src);

/* The rule under "studioml" for one key: added when ``dst`` lacks it, dicts merged add-only,
   nothing replaced. */
static int add_one(PyObject *dst, PyObject *key, PyObject *value)
{
    PyObject *cur = PyDict_GetItemWithError(dst, key);
    if (cur)
        return (PyDict_Check(cur) && PyDict_Check(value)) ? add_only(cur, value) : 0;
    return PyErr_Occurred() ? -1 : PyDict_SetItem(dst, key, value);
}

/* The rule under "studioml": keys ``dst`` lacks are added, nothing is replaced (also the
   compiled ``merge_object``'s). */
static int add_only(PyObject *dst, PyObject *src)
{
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(src, &pos, &key, &value))
        if (add_one(dst, key, value) < 0)
            return -1;
    return 0;
}

/* The collected "studioml" values, oldest first. */
static int apply_studioml(Accumulator &acc, PyObject *doc)
{
    static PyObject *name = PyUnicode_InternFromString("studioml");
    if (!name)
        return -1;
    for (Py_ssize_t i = PyList_GET_SIZE(acc.studioml) - 1; i >= 0; i--)
        if (add_one(doc, name, PyList_GET_ITEM(acc.studioml, i)) < 0)
            return -1;
    return 0;
}

/* Merge ``node`` (the accumulator or one of its open nodes) into the dict ``doc``; at the root
   (``acc`` given) the "studioml" values go in at their stamp. */
static int merge_node(PyObject *doc, Node *node, Accumulator *acc = nullptr)
{
    bool studioml_due = acc && PyList_GET_SIZE(acc->studioml) > 0;
    for (const Item &item : in_stamp_order(node)) {
        Entry *entry = item.second;
        if (studioml_due && entry->first > acc->studioml_first) {
            studioml_due = false;
            if (apply_studioml(*acc, doc) < 0)
                return -1;
        }
        PyObject *key = new_str(*item.first);
        if (!key)
            return -1;
        int r;
        PyObject *cur = nullptr;
        if (entry->node && !entry->node->sealed)
            cur = PyDict_GetItemWithError(doc, key);
        if (cur && PyDict_Check(cur)) {
            r = merge_node(cur, entry->node);
        } else if (PyErr_Occurred()) {
            r = -1;
        } else {
            PyObject *val = materialize(entry);
            r = val ? PyDict_SetItem(doc, key, val) : -1;
            Py_XDECREF(val);
        }
        Py_DECREF(key);
        if (r < 0)
            return -1;
    }
    return studioml_due ? apply_studioml(*acc, doc) : 0;
}

static int merge_final(Accumulator &acc, PyObject *doc)
{
    if (!acc.studioml)
        return -1;
    return merge_node(doc, &acc.root, &acc);
}

}  // namespace runner_sj
#endif
